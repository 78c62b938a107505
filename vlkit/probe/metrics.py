"""Probe metrics as pure numpy functions: Winoground scores, tag breakdowns, caption-pair accuracy, bootstrap.

Winoground (Thrush et al. 2022). For an example with captions c0, c1, images i0, i1 and a score s(c, i),
held as an (N, 2, 2) array ``scores[n, caption, image]``:

- text score:  s(c0, i0) > s(c1, i0)  and  s(c1, i1) > s(c0, i1)   (for each image the right caption wins)
- image score: s(c0, i0) > s(c0, i1)  and  s(c1, i1) > s(c1, i0)   (for each caption the right image wins)
- group score: both.

Comparisons are strict, so a tie is never a win. Scores are averaged over examples and reported in percent;
chance is 25, 25 and 16.67 (1/6: of the 24 orderings of four distinct scores, 4 satisfy both).

Caption-pair probes (ARO, SugarCrepe): one image, a true and a false caption; an example is correct when
s(true, image) > s(false, image) (strictly). Accuracy is the macro average over categories.

Uncertainty: a percentile bootstrap over examples (seeded; default 1000 resamples). The paired bootstrap of
a difference between two systems scores both on the *same* resample indices, so the example-level
correlation between the systems is kept and the interval of the difference is much tighter than the two
separate intervals suggest.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from ..scoring import as_score_array, winoground_correct  # noqa: F401  (part of this module's API)

WINOGROUND_METRICS = ("text", "image", "group")
CHANCE = {"text": 25.0, "image": 25.0, "group": 100.0 / 6.0}
BREAKDOWN_KEYS = ("collapsed_tag", "num_main_preds", "secondary_tag", "tag")


# ----------------------------------------------------------------------------------------- Winoground


def mean_percent(values: Any) -> float:
    """100 × the mean of a boolean/0-1 vector (nan when empty)."""
    v = np.asarray(values, dtype=np.float64)
    return float(100.0 * v.mean()) if v.size else float("nan")


def winoground_scores(correct: dict[str, np.ndarray]) -> dict[str, float]:
    """Text, image and group scores in percent from per-example booleans."""
    return {m: mean_percent(correct[m]) for m in WINOGROUND_METRICS}


def split_tags(value: Any) -> list[str]:
    """The tags of one cell: comma-separated, spaces stripped, empty tags skipped ('' gives [])."""
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [str(v).strip() for v in value if str(v).strip()]
    return [t.strip() for t in str(value).split(",") if t.strip()]


def groups_of(values: Sequence[Any], multi: bool = False) -> dict[str, np.ndarray]:
    """Example indices of each tag value (sorted by tag); with `multi`, a cell counts in each of its tags."""
    out: dict[str, list[int]] = {}
    for i, v in enumerate(values):
        tags = split_tags(v) if multi else ([] if v is None or str(v).strip() == "" else [str(v).strip()])
        for t in dict.fromkeys(tags):
            out.setdefault(t, []).append(i)
    return {k: np.asarray(out[k], dtype=np.int64) for k in sorted(out)}


def breakdown(
    correct: dict[str, np.ndarray], values: Sequence[Any], multi: bool = False, metrics: Iterable[str] | None = None
) -> dict[str, dict[str, float]]:
    """``{tag: {"n": count, metric: percent, ...}}`` over the examples carrying each tag."""
    metrics = tuple(metrics or correct)
    out: dict[str, dict[str, float]] = {}
    for tag, idx in groups_of(values, multi=multi).items():
        row: dict[str, float] = {"n": int(len(idx))}
        for m in metrics:
            row[m] = mean_percent(np.asarray(correct[m])[idx])
        out[tag] = row
    return out


def winoground_breakdowns(correct: dict[str, np.ndarray], tags: Mapping[str, Sequence[Any]]) -> dict[str, Any]:
    """Breakdowns by collapsed_tag, num_main_preds, secondary_tag (comma-separated, multi-valued) and the
    fine-grained tag, for whichever of those columns `tags` has."""
    out = {}
    for key in BREAKDOWN_KEYS:
        if key in tags and tags[key] is not None:
            out[key] = breakdown(correct, tags[key], multi=(key == "secondary_tag"), metrics=WINOGROUND_METRICS)
    return out


# ----------------------------------------------------------------------------------------- caption pairs


def caption_pair_correct(true_scores: Any, false_scores: Any) -> np.ndarray:
    """Per-example booleans: the true caption scores strictly higher than the false one."""
    t = np.asarray(true_scores.detach().cpu() if hasattr(true_scores, "detach") else true_scores, dtype=np.float64)
    f = np.asarray(false_scores.detach().cpu() if hasattr(false_scores, "detach") else false_scores, dtype=np.float64)
    if t.shape != f.shape:
        raise ValueError(f"true and false scores differ in shape: {t.shape} vs {f.shape}")
    return t > f


def caption_pair_accuracy(correct: Any, categories: Sequence[Any] | None = None) -> dict[str, Any]:
    """``{"macro", "micro", "per_category": {cat: {"n", "accuracy"}}}`` in percent (macro = mean over
    categories; with no categories every example is in one category and macro = micro)."""
    c = np.asarray(correct, dtype=bool)
    cats = list(categories) if categories is not None else ["all"] * len(c)
    per = {}
    for cat, idx in groups_of(cats).items():
        per[cat] = {"n": int(len(idx)), "accuracy": mean_percent(c[idx])}
    macro = float(np.mean([v["accuracy"] for v in per.values()])) if per else float("nan")
    return {"macro": macro, "micro": mean_percent(c), "per_category": per}


# ----------------------------------------------------------------------------------------- bootstrap

Statistic = Callable[[np.ndarray], np.ndarray]


def bootstrap_indices(n: int, n_boot: int = 1000, seed: int = 0) -> np.ndarray:
    """(n_boot, n) resample indices drawn with replacement from a seeded generator."""
    if n < 1:
        raise ValueError("bootstrap needs at least one example")
    if n_boot < 1:
        raise ValueError(f"bootstrap needs at least one resample, got {n_boot}")
    return np.random.default_rng(seed).integers(0, n, size=(int(n_boot), int(n)))


def mean_statistic(values: Any) -> Statistic:
    """Statistic: 100 × the mean of `values` on each resample."""
    v = np.asarray(values, dtype=np.float64)
    return lambda idx: 100.0 * v[idx].mean(axis=1)


def macro_statistic(values: Any, categories: Sequence[Any]) -> Statistic:
    """Statistic: 100 × the macro mean over categories on each resample (a category absent from a resample
    is left out of that resample's mean)."""
    v = np.asarray(values, dtype=np.float64)
    names = sorted({str(c) for c in categories})
    codes = np.asarray([names.index(str(c)) for c in categories], dtype=np.int64)

    def stat(idx: np.ndarray) -> np.ndarray:
        vals, cs = v[idx], codes[idx]
        per = np.full((idx.shape[0], len(names)), np.nan)
        for k in range(len(names)):
            mask = cs == k
            count = mask.sum(axis=1)
            with np.errstate(invalid="ignore", divide="ignore"):
                per[:, k] = np.where(count > 0, (vals * mask).sum(axis=1) / np.maximum(count, 1), np.nan)
        return 100.0 * np.nanmean(per, axis=1)

    return stat


def percentile_interval(samples: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """The central `level` percentile interval of bootstrap samples."""
    if not 0.0 < level < 1.0:
        raise ValueError(f"confidence level must be in (0, 1), got {level}")
    lo, hi = np.percentile(np.asarray(samples, dtype=np.float64), [50 * (1 - level), 50 * (1 + level)])
    return float(lo), float(hi)


def bootstrap_ci(
    values: Any = None,
    *,
    statistic: Statistic | None = None,
    n: int | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
    indices: np.ndarray | None = None,
) -> tuple[float, float]:
    """Percentile bootstrap interval of 100 × mean(values) (or of `statistic` over `n` examples).

    The same `seed` (or the same `indices`) gives the same interval.
    """
    if statistic is None:
        statistic = mean_statistic(values)
        n = len(np.asarray(values))
    if indices is None:
        if n is None:
            raise ValueError("give values, or a statistic with n")
        indices = bootstrap_indices(n, n_boot, seed)
    return percentile_interval(statistic(indices), level)


def paired_bootstrap_diff(
    base: Any = None,
    other: Any = None,
    *,
    base_stat: Statistic | None = None,
    other_stat: Statistic | None = None,
    n: int | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
    indices: np.ndarray | None = None,
) -> dict[str, float]:
    """Difference other − base (percentage points) with a paired percentile bootstrap interval.

    Both systems are scored on the same resampled examples. Returns ``{"value", "low", "high", "p_le_0"}``
    (p_le_0: the share of resamples where the difference is ≤ 0, a one-sided bootstrap p-value for a gain).
    """
    if base_stat is None or other_stat is None:
        b, o = np.asarray(base, dtype=np.float64), np.asarray(other, dtype=np.float64)
        if b.shape != o.shape:
            raise ValueError(f"paired bootstrap needs the same examples: {b.shape} vs {o.shape}")
        base_stat, other_stat, n = mean_statistic(b), mean_statistic(o), len(b)
        value = 100.0 * float(o.mean() - b.mean())
    else:
        value = None
    if indices is None:
        if n is None:
            raise ValueError("give base and other, or two statistics with n")
        indices = bootstrap_indices(n, n_boot, seed)
    if value is None:
        full = np.arange(indices.shape[1])[None, :]
        value = float(other_stat(full)[0] - base_stat(full)[0])
    diffs = other_stat(indices) - base_stat(indices)
    low, high = percentile_interval(diffs, level)
    return {"value": value, "low": low, "high": high, "p_le_0": float(np.mean(diffs <= 0))}
