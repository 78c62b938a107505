"""Multi-task adapter composition on one frozen backbone: many adapters, routing, sharing and merging.

- `load_composition(backbone, dir)` / `resolve_adapter_arg(backbone, arg)`: composition directories and
  adapter arguments (a dir, a composition, `a+b`) onto a backbone (vlkit.compose.composition / .resolve).
- `compose(sources, mode, out, ...)`: what `vlkit compose` runs — stack, average, parallel, route,
  merge, wise, gate (vlkit.compose.api).
- `merge_adapters(...)`: linear, task arithmetic, TIES, LoRA concat and SVD merges (vlkit.compose.merge).
- `train_router`, `RoutedBackbone`: automatic per-input routing (vlkit.compose.router).
- `calibrate_gate`, `DomainGate`: a domain gate fitted to adapters' own training data; other inputs run through
  the frozen backbone (vlkit.compose.gate; `vlkit compose A --mode gate`, `vlkit adapt`'s default).
- `add_fusion`, `load_fusion`: AdapterFusion layers (vlkit.compose.adapter_fusion).
- multi-task training with sharing schemes: recipes with `tasks:` and `sharing:` (vlkit.train.multitask;
  sharing schemes in vlkit.compose.sharing).

Per-sample routing inside a batch is `AdaptedModel.route(names, index)`.
"""

from __future__ import annotations

_LAZY = {
    "compose": "vlkit.compose.api",
    "resolve_sources": "vlkit.compose.api",
    "source_dirs": "vlkit.compose.resolve",
    "load_composition": "vlkit.compose.resolve",
    "write_composition": "vlkit.compose.composition",
    "read_composition": "vlkit.compose.composition",
    "Composition": "vlkit.compose.composition",
    "frozen": "vlkit.compose.composition",
    "resolve_adapter_arg": "vlkit.compose.resolve",
    "AdapterResolver": "vlkit.compose.resolve",
    "System": "vlkit.compose.resolve",
    "merge_adapters": "vlkit.compose.merge",
    "train_router": "vlkit.compose.router",
    "RoutedBackbone": "vlkit.compose.router",
    "Router": "vlkit.compose.router",
    "calibrate_gate": "vlkit.compose.gate",
    "DomainGate": "vlkit.compose.gate",
    "add_fusion": "vlkit.compose.adapter_fusion",
    "load_fusion": "vlkit.compose.adapter_fusion",
    "tie_shared": "vlkit.compose.sharing",
    "run_composition": "vlkit.compose.predict",
}

__all__ = list(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'vlkit.compose' has no attribute {name!r}")
