"""Diagnostic probes: Winoground and caption-pair probes for the backbone alone and with each adapter.

>>> from vlkit.probe import run_probe
>>> result = run_probe("winoground", backbone="tiny", adapters="runs/rel/adapter", data="synth", n=400)
>>> result["systems"][1]["diff"]["group"]      # paired bootstrap interval of the gain, in points

Probes are plugins (hook ``register_probes``); see `vlkit.probe.base` for the interface and the result.
"""

from __future__ import annotations

from typing import Any

__all__ = ["run_probe"]


def run_probe(name: str, backbone: Any = "tiny", adapters: Any = None, **options: Any) -> dict[str, Any]:
    """Run probe `name` on `backbone` (a spec or a loaded backbone), the frozen backbone first, then each item
    of `adapters` ("a,b,a+b" or a list: adapter directories, loaded names, stacks, composition directories).
    Options go to the probe's ``run`` (data, seed, n, n_boot, level, ...)."""
    from .base import get_probe
    from .systems import resolve_systems

    probe = get_probe(name)
    if isinstance(backbone, str):
        from ..backbones.loading import load_backbone

        backbone = load_backbone(backbone)
    systems = resolve_systems(backbone, adapters)
    return probe.run(backbone, systems, **options)
