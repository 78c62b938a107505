"""vlkit: parameter-efficient transfer learning for vision-language models.

Freeze a CLIP-style backbone, inject small adapters into its vision and text towers, train, compose,
probe and export them. Heavy modules (torch) load lazily so `import vlkit` and `vlkit --help` stay fast.
"""

from __future__ import annotations

__version__ = "0.1.0"

_LAZY = {
    "load": "vlkit.adapters.model",
    "AdaptedModel": "vlkit.adapters.model",
    "AdapterHandle": "vlkit.adapters.model",
    "load_backbone": "vlkit.backbones.loading",
    "inject": "vlkit.adapters.inject",
    "merge_adapter": "vlkit.adapters.inject",
    "unmerge_adapter": "vlkit.adapters.inject",
    "merge_and_unload": "vlkit.adapters.inject",
    "load_adapter": "vlkit.adapters.inject",
    "save_adapter": "vlkit.adapters.inject",
    "parameter_report": "vlkit.adapters.inject",
    "get_plugins": "vlkit.plugins",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    import importlib

    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    if not name.startswith("_"):  # a subpackage on first use: `import vlkit; vlkit.world.generate(...)`
        import importlib.util

        if importlib.util.find_spec(f"{__name__}.{name}") is not None:
            return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module 'vlkit' has no attribute {name!r}")
