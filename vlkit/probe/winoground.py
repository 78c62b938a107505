"""The Winoground probe: text, image and group scores of the backbone and each adapter configuration.

Data (``data=``): ``"synth"`` (default; the embedded world's verified minimal pairs, 400 unless ``n``),
``"hub"`` (``facebook/winoground``, gated: the user's HF token, the hub repo's parquet layout), ``"hub:ID"``,
a local copy (a folder of parquet files, or ``examples.jsonl`` with an ``images/`` folder), or a
`datasets.Dataset` with the Winoground columns. Loading goes through `vlkit.data.load_data`; images reach the
backbone's own transform in their own mode (RGBA, P, CMYK, ...). ``n`` keeps the first n examples of a real copy.

Each system scores the four (caption, image) combinations of every example through `vlkit.scoring`; the
scores follow Thrush et al. 2022 exactly (strict ``>``, see `vlkit.probe.metrics`), with breakdowns by
``collapsed_tag``, ``num_main_preds``, ``secondary_tag`` and the fine-grained ``tag``, a seeded bootstrap
interval per score (and per tag) and a paired bootstrap interval for each adapter's difference to the frozen
backbone.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..data import load_data
from ..data.images import ImageReader
from ..errors import ConfigError
from . import metrics as M
from .base import DEFAULT_RESAMPLES, Probe, ProbeOptions, annotate_breakdowns, build_result, summarize
from .systems import score_examples

SCORE_KEYS = ("c0_i0", "c0_i1", "c1_i0", "c1_i1")
SYNTH_N = 400


def load_winoground_data(data: Any = None, *, n: int | None = None, data_seed: int | None = None):
    """(dataset, label) for a Winoground data argument (see the module docstring). `data_seed` generates synth
    pairs (default 0); a fixed copy (hub, DIR, a Dataset) refuses it, since it would change nothing."""
    import datasets

    synth = data is None or str(data) == "synth" or str(data).startswith("synth:")
    if data_seed is not None and not synth and not isinstance(data, datasets.Dataset):
        raise ConfigError(
            f"data seed {data_seed} generates synth pairs; winoground data {data} is a fixed copy "
            "(--n takes its first n)"
        )
    if isinstance(data, datasets.Dataset):
        if data_seed is not None:
            raise ConfigError("data seed generates synth pairs; a given dataset is fixed")
        ds, label = data, "winoground:dataset"
    elif data is None or str(data) == "synth" or str(data).startswith("synth:"):
        domain = str(data).partition(":")[2] if data else ""
        spec = {"kind": "winoground", "source": "synth", "n": int(n or SYNTH_N), "seed": int(data_seed or 0)}
        if domain:
            spec["domain"] = domain
        ds = load_data(spec, task="winoground")
        label = f"winoground:synth{'-' + domain if domain else ''}"
    elif str(data) == "hub" or str(data).startswith("hub:"):
        ds = load_data({"kind": "winoground", "source": str(data)}, task="winoground")
        label = str(data)[4:] if str(data).startswith("hub:") else "facebook/winoground"
    else:
        path = Path(str(data)).expanduser()
        ds = load_data({"kind": "winoground", "source": str(path)}, task="winoground")
        label = f"winoground:{path.resolve().name}"
    if n is not None:
        if int(n) < 1:
            raise ConfigError(f"n must be at least 1, got {n}")
        if len(ds) > int(n):
            ds = ds.select(range(int(n)))
    if len(ds) == 0:
        raise ConfigError(f"winoground data {label} has no examples")
    return ds, label


def winoground_batches(ds) -> Callable[[int, int], tuple[list[list[Any]], list[list[str]]]]:
    """get_batch for `score_examples`: images (image_0, image_1), decoded by `vlkit.imagefile` in their own mode
    for the backbone's own transform, and captions (caption_0, caption_1)."""

    label = getattr(ds, "_vlkit_label", None) or "winoground data"
    readers = [ImageReader(ds, c, label=label) for c in ("image_0", "image_1")]
    texts = ds.select_columns(["caption_0", "caption_1"])

    def get(start: int, stop: int):
        rows = list(range(start, stop))
        images = [list(pair) for pair in zip(*(r.read(rows) for r in readers), strict=True)]
        cap = texts[start:stop]
        captions = [[str(a), str(b)] for a, b in zip(cap["caption_0"], cap["caption_1"])]
        return images, captions

    return get


def tags_of(ds) -> dict[str, list[Any]]:
    return {key: list(ds[key]) for key in M.BREAKDOWN_KEYS if key in ds.column_names}


def evaluate_scores(
    scores: dict[str, np.ndarray],
    tags: dict[str, list[Any]],
    *,
    n_boot: int = DEFAULT_RESAMPLES,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(summary, breakdowns) of per-system (N, 2, 2) scores: see `base.summarize`."""
    labels = list(scores)
    correct = {label: M.winoground_correct(s) for label, s in scores.items()}
    n = len(next(iter(scores.values())))
    summary = summarize(
        labels, correct, {m: M.mean_statistic for m in M.WINOGROUND_METRICS}, n, n_boot=n_boot, seed=seed, level=level
    )
    breakdowns = {label: M.winoground_breakdowns(correct[label], tags) for label in labels}
    groups = {key: M.groups_of(values, multi=(key == "secondary_tag")) for key, values in tags.items()}
    annotate_breakdowns(breakdowns, groups, correct, M.WINOGROUND_METRICS, n_boot=n_boot, seed=seed, level=level)
    return summary, breakdowns


@dataclass
class WinogroundProbeOptions(ProbeOptions):
    """The options of the `winoground` probe."""

    data_seed: int | None = None
    """Seed of generated (synth) pairs (--data-seed); a fixed copy (hub, DIR) refuses it; None: 0."""
    batch_size: int = 32
    """Examples scored per batch (--batch-size)."""


class WinogroundProbe(Probe):
    """Winoground (Thrush et al. 2022): does the model match two captions with the same words to two images?"""

    name = "winoground"
    required = ("image_0", "image_1", "caption_0", "caption_1")
    show_columns = ("tag", "collapsed_tag", "caption_0", "caption_1")
    summary = "Winoground text/image/group scores with tag breakdowns and bootstrap intervals"
    data_help = "synth (default: the embedded world's minimal pairs), hub (facebook/winoground, gated), or DIR"
    default_data = "synth"
    options_cls = WinogroundProbeOptions

    def run(
        self,
        backbone,
        systems,
        *,
        data: Any = None,
        seed: int = 0,
        n: int | None = None,
        n_boot: int = DEFAULT_RESAMPLES,
        level: float = 0.95,
        data_seed: int | None = None,
        batch_size: int = 32,
        progress: Callable[[int], Callable[[int], None]] | None = None,
        **options: Any,
    ) -> dict[str, Any]:
        if options:
            raise ConfigError(f"unknown option(s) for probe 'winoground': {', '.join(sorted(options))}")
        ds, label = load_winoground_data(data if data is not None else self.default_data, n=n, data_seed=data_seed)
        n_ex = len(ds)
        advance = progress(n_ex) if progress is not None else None
        scores = score_examples(
            backbone, systems, n_ex, winoground_batches(ds), batch_size=batch_size, progress=advance
        )
        tags = tags_of(ds)
        summary, breakdowns = evaluate_scores(scores, tags, n_boot=n_boot, seed=seed, level=level)
        ids = list(ds["id"]) if "id" in ds.column_names else list(range(n_ex))
        per_example = {
            "ids": ids,
            "keys": list(SCORE_KEYS),
            "scores": {lab: s.reshape(len(s), 4).tolist() for lab, s in scores.items()},
        }
        counts = {
            key: {tag: len(idx) for tag, idx in M.groups_of(values, multi=(key == "secondary_tag")).items()}
            for key, values in tags.items()
        }
        return build_result(
            self,
            backbone,
            systems,
            dataset=label,
            n=n_ex,
            metrics=M.WINOGROUND_METRICS,
            primary="group",
            chance=M.CHANCE,
            summary=summary,
            breakdowns=breakdowns,
            n_boot=n_boot,
            seed=seed,
            level=level,
            per_example=per_example,
            extra={"tag_counts": counts},
        )
