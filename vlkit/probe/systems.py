"""What a probe compares: the frozen backbone and adapter configurations ("systems"), and how they score.

Each ``--adapters`` item becomes a :class:`System` through `vlkit.compose.resolve.resolve_adapter_arg`, the
one resolver shared with `vlkit compose` and `vlkit export`:

- ``path/to/adapter``   an adapter directory (adapter_config.json + adapter_model.safetensors), loaded onto
                        the backbone under a free name;
- ``name``              an adapter already loaded on the backbone;
- ``a+b``               a stack of the parts (each a path or a loaded name), ``set_active(a, b, mode="stack")``;
- ``path/to/comp``      a composition directory from `vlkit compose` (``composition.json``: stack, average,
                        parallel, fuse, route or merge);
- ``backbone``/``none`` the frozen backbone.

An adapter directory named several times (``a,b,a+b``) is loaded once. `score_examples` scores examples of
``t`` captions and ``m`` images under each system through `vlkit.scoring` (dual encoders: one embedding
per image and caption; fusion adapters: every (caption, image) pair jointly; route compositions: each input
through the adapter its router picks), preprocessing each batch once for all systems. On a generative
backbone a pair's score is VQAScore's, `vlkit.scoring.answer_scores`: P("Yes") to
`Does this image show "{caption}"? Please answer yes or no.`
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from ..adapters.model import AdaptedModel
from ..compose.resolve import AdapterResolver, System, frozen_system, resolve_adapter_arg
from ..errors import ConfigError
from ..scoring import answer_scores, is_generative, pair_scores, paired_scores, uses_joint_scoring

__all__ = [
    "AdapterResolver",
    "System",
    "frozen_system",
    "resolve_adapter_arg",
    "parse_adapters",
    "resolve_systems",
    "score_examples",
]


def parse_adapters(value: str | Sequence[str] | None) -> list[str]:
    """``"a,b,a+b"`` (or a list of such strings) to its items."""
    if value is None:
        return []
    items = [value] if isinstance(value, str) else list(value)
    return [p.strip() for item in items for p in str(item).split(",") if p.strip()]


def resolve_systems(backbone, adapters: str | Sequence[str] | None) -> list[System]:
    """The frozen backbone followed by one system per ``--adapters`` item (labels must be distinct)."""
    resolver = AdapterResolver(backbone)
    systems = [frozen_system()]
    for item in parse_adapters(adapters):
        system = resolver.resolve(item)
        if system.names:
            systems.append(system)
    labels = [s.label for s in systems]
    dup = next((x for x in labels if labels.count(x) > 1), None)
    if dup is not None:
        raise ConfigError(f"--adapters names {dup!r} twice")
    return systems


# ----------------------------------------------------------------------------------------- scoring

Batch = Callable[[int, int], tuple[list[list[Any]], list[list[str]]]]


def _device(backbone):
    import torch

    for p in backbone.parameters():
        return p.device
    return torch.device("cpu")


def score_examples(
    backbone,
    systems: Sequence[System],
    n: int,
    get_batch: Batch,
    *,
    batch_size: int = 32,
    progress: Callable[[int], None] | None = None,
) -> dict[str, np.ndarray]:
    """Scores of each system: ``{label: array (n, t, m)}`` with ``[example, caption, image]``.

    ``get_batch(start, stop)`` returns, for examples ``start..stop-1``, their images (a list of ``m`` PIL
    images each) and captions (``t`` strings each). The backbone's active adapters are restored afterwards.
    """
    import torch

    device = _device(backbone)
    generative = is_generative(backbone)
    if generative:
        bad = next((s for s in systems if s.mode in ("route", "fuse")), None)
        if bad is not None:
            part = "router" if bad.mode == "route" else "fusion"
            raise ConfigError(
                f"{bad.label} is a {bad.mode} composition: its {part} reads dual-encoder embeddings, "
                f"which generative backbone {backbone.spec} has not"
            )
    out: dict[str, list[np.ndarray]] = {s.label: [] for s in systems}
    with AdaptedModel.of(backbone).preserved():
        for start in range(0, n, batch_size):
            stop = min(n, start + batch_size)
            images, captions = get_batch(start, stop)
            k = stop - start
            m, t = len(images[0]), len(captions[0])
            if any(len(x) != m for x in images) or any(len(c) != t for c in captions):
                raise ValueError("every example needs the same number of images and of captions")
            with torch.no_grad():
                pixels = backbone.preprocess_batch([im for ims in images for im in ims]).to(device)
                texts = [c for cs in captions for c in cs]
                ex = torch.arange(k).repeat_interleave(t * m)
                cap = torch.arange(t).repeat_interleave(m).repeat(k)
                img = torch.arange(m).repeat(k * t)
                rows, cols = (ex * t + cap).to(device), (ex * m + img).to(device)
                if generative:  # every (caption, image) pair: P("Yes") to whether the image shows the caption
                    for system in systems:
                        system.activate(backbone)
                        s = answer_scores(backbone, pixels[cols], [texts[r] for r in rows.tolist()])
                        out[system.label].append(s.float().cpu().numpy().reshape(k, t, m))
                    if progress is not None:
                        progress(k)
                    continue
                tokens = backbone.tokenize(texts).to(device)
                for system in systems:
                    system.activate(backbone)
                    model = system.wrap(backbone)
                    if uses_joint_scoring(model):  # fusion: only the pairs needed, each scored jointly
                        s = paired_scores(model, pixels[cols], tokens[rows])
                    else:
                        s = pair_scores(model, pixels, tokens)[rows, cols]
                    out[system.label].append(s.float().cpu().numpy().reshape(k, t, m))
            if progress is not None:
                progress(k)
    return {label: np.concatenate(parts) if parts else np.zeros((0, 0, 0)) for label, parts in out.items()}
