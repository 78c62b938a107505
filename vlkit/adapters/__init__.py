"""Adapters: injection core, variant interface, built-in variants (bottleneck, LoRA), files and reports.

For variant authors: `AdapterVariant` / `AdapterConfig` (vlkit.adapters.base), and `linear_weights(module,
role)` / `LinearView` / `base_for_site` (vlkit.adapters.weights), importable from here.
"""

_LAZY = {
    "AdapterVariant": "vlkit.adapters.base",
    "AdapterConfig": "vlkit.adapters.base",
    "linear_weights": "vlkit.adapters.weights",
    "LinearView": "vlkit.adapters.weights",
    "base_for_site": "vlkit.adapters.weights",
    "merge_and_unload": "vlkit.adapters.inject",
}

__all__ = list(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'vlkit.adapters' has no attribute {name!r}")
