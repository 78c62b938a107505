"""`vlkit eval`: the frozen backbone and each adapter argument scored on one dataset for one task.

Systems come from `vlkit.compose.resolve` (adapter directories, ``a+b`` stacks, compositions of any mode,
routers), the frozen backbone first. Every system is scored with the task's own `evaluate` on the same
prepared data, the towers' features taken from the feature cache (`vlkit.tasks.features.CACHE`; a routed
composition runs its router on each input instead). Where the task gives per-example values
(`Task.example_values`) each metric gets a percentile bootstrap interval and the primary metric a paired
bootstrap difference against the frozen backbone, as the probes report them (`vlkit.probe.metrics`): one
set of resample indices is shared by every system.

Options:

- ``alphas``: WiSE-FT's sweep: each single-adapter system again at each α, the adapter's delta at every site
  scaled by α (the ``wise`` composition mode; α = 0 is the frozen backbone, α = 1 the adapter);
- ``general``: a data spec of the general (pre-training) domain; every system is also scored there and its
  ``retention`` (its general score as a percentage of the frozen backbone's) reported;
- ``data`` as a list of specs: each dataset scored as it would be alone, one result each under ``datasets``
  (`vlkit eval --data A --data B` prints one column group per dataset).

Percentages are rounded to 2 decimals in the result.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from ..adapters.model import AdaptedModel
from ..backbones.loading import load_backbone
from ..compose.resolve import AdapterResolver, System, frozen_system
from ..data.api import load_data, parse_data_spec
from ..errors import ConfigError, DataError
from ..plugins import registry
from ..probe.metrics import (
    bootstrap_indices,
    macro_statistic,
    mean_statistic,
    paired_bootstrap_diff,
    percentile_interval,
)
from ..probe.systems import parse_adapters
from ..tasks.features import CACHE

FROZEN = ("vision", "text")


NOT_PERCENT = ("C", "lr", "alpha", "beta", "weights", "level", "p_le_0")  # kept as they are


def round_percent(value: Any, digits: int = 2) -> Any:
    """Floats rounded to `digits` decimals, through dicts and lists (what a percentage means, not float noise);
    the values of keys in NOT_PERCENT (hyperparameters, weights) are kept as they are."""
    if isinstance(value, float):
        return round(value, digits) if np.isfinite(value) else value
    if isinstance(value, dict):
        return {k: v if k in NOT_PERCENT else round_percent(v, digits) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [round_percent(v, digits) for v in value]
    return value


def parse_alphas(text: str | Sequence[float] | None) -> list[float]:
    """'0,0.25,0.5' (or numbers) to floats in [0, 1]."""
    if text is None:
        return []
    items: Any = [text] if isinstance(text, (int, float)) else text
    if isinstance(items, str):
        items = [p for p in items.split(",") if p.strip()]
    try:
        values = [float(a) for a in items]
    except ValueError:
        raise ConfigError(f"--alpha must be comma-separated numbers in [0, 1], got {text!r}") from None
    bad = [a for a in values if not 0.0 <= a <= 1.0]
    if bad or not values:
        raise ConfigError(f"--alpha values must lie in [0, 1] (0: the frozen backbone, 1: the adapter), got {text!r}")
    return values


def load_eval_data(data: Any, task: str, split: str | None = None) -> tuple[Any, str | None]:
    """The dataset to score: `data`'s `split`; without one, its test split where it has one, else all of it."""
    spec = parse_data_spec(data)
    wanted = split or spec.pop("split", None)
    spec["task"] = task
    if wanted is not None:
        return load_data(spec, split=wanted), wanted
    try:
        return load_data(spec, split="test"), "test"
    except DataError as exc:
        if "split" not in str(exc):
            raise
    return load_data(spec), None


def wise_systems(systems: Sequence[System], alphas: Sequence[float]) -> list[System]:
    """Each single-adapter system followed by its α-scaled versions (parallel activation with weight α)."""
    out: list[System] = []
    for s in systems:
        out.append(s)
        if not alphas or not s.names:
            continue
        if len(s.names) != 1 or s.mode not in ("stack", "parallel"):
            raise ConfigError(
                f"--alpha scales one adapter; {s.label!r} is a {s.mode} of {len(s.names)} adapters",
                hint="give the adapters one by one, or compose them first (vlkit compose)",
            )
        base = (s.weights or [1.0])[0] if s.mode == "parallel" else 1.0
        for a in alphas:
            out.append(
                System(
                    label=f"{s.label} α={a:g}",
                    names=s.names,
                    mode="parallel",
                    weights=[a * base],
                    sources=list(s.sources),
                    slug=f"{s.slug}-a{a:g}",
                )
            )
    return out


def _build_task(backbone, name: str, ds, options: dict[str, Any]):
    return registry("task").get(name)(backbone, ds, **options)


def score_system(
    backbone, system: System, task_name: str, ds, data, options: dict[str, Any], batch_size: int
) -> tuple[dict[str, float], dict[str, Any]]:
    """(metrics, per-example values) of one system: a fresh task on `ds`, features from the cache."""
    model = AdaptedModel.of(backbone)
    with model.preserved(), torch.no_grad():
        system.activate(backbone)
        view = system.wrap(backbone)
        task = _build_task(backbone, task_name, ds, options)
        if view is backbone:
            data = task.cache_features(backbone, data, set(FROZEN), CACHE)
        metrics = task.evaluate(view, data, batch_size)
        values = task.example_values(view, data, batch_size)
    return metrics, values


def _statistic(values, groups):
    v = values.detach().cpu().numpy() if hasattr(values, "detach") else np.asarray(values)
    if groups is None:
        return mean_statistic(v)
    g = groups.detach().cpu().numpy() if hasattr(groups, "detach") else np.asarray(groups)
    return macro_statistic(v, g.tolist())


def add_intervals(
    rows: list[dict[str, Any]], values: list[dict[str, Any]], metric: str, n_boot: int, level: float, seed: int
) -> None:
    """Bootstrap intervals of each row's metrics and the paired difference of `metric` to the first row."""
    n = next((len(v[0]) for vals in values for v in vals.values()), 0)
    if n < 1 or n_boot < 1:
        return
    indices = bootstrap_indices(n, n_boot, seed)
    base = values[0].get(metric)
    for row, vals in zip(rows, values):
        stats = {m: _statistic(*v) for m, v in vals.items() if len(v[0]) == n}
        row["intervals"] = {m: list(percentile_interval(stat(indices), level)) for m, stat in stats.items()}
        if row is not rows[0] and base is not None and metric in stats:
            row["delta"] = paired_bootstrap_diff(
                base_stat=_statistic(*base), other_stat=stats[metric], indices=indices, level=level
            )


def run_eval(
    backbone: Any = "tiny",
    adapters: str | Sequence[str] | None = None,
    *,
    data: Any,
    task: str,
    options: dict[str, Any] | None = None,
    split: str | None = None,
    alphas: Sequence[float] = (),
    general: Any = None,
    bootstrap: int = 1000,
    level: float = 0.95,
    seed: int = 0,
    batch_size: int = 256,
    device: str | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Score the frozen backbone and each adapter argument on `data` for `task` (a registered task name);
    returns the result `vlkit eval --json` prints (rows in order: the backbone first).

    `data` a list of several data specs: each is scored as it would be alone, and the result holds `data` (the
    list) and `datasets` (one single-dataset result each; the general domain's scores, the same for all, are
    computed once)."""
    if task not in registry("task"):
        raise ConfigError(f"unknown task {task!r}; known: {', '.join(registry('task').names())}")
    if bootstrap < 0:
        raise ConfigError(f"--bootstrap must be >= 0, got {bootstrap}")
    if not 0.0 < level < 1.0:
        raise ConfigError(f"--level must be in (0, 1), got {level}")
    specs = list(data) if isinstance(data, (list, tuple)) else [data]
    if not specs:
        raise ConfigError("--data names no dataset")
    labels = [d if isinstance(d, str) else str(d) for d in specs]
    dup = next((x for x in labels if labels.count(x) > 1), None)
    if dup is not None:
        raise ConfigError(f"--data names {dup!r} twice")
    bb = load_backbone(backbone, device=device) if isinstance(backbone, str) else backbone
    resolver = AdapterResolver(bb)
    systems = [frozen_system()] + [s for s in (resolver.resolve(a) for a in parse_adapters(adapters)) if s.names]
    names = [s.label for s in systems]
    dup = next((x for x in names if names.count(x) > 1), None)
    if dup is not None:
        raise ConfigError(f"--adapters names {dup!r} twice")
    systems = wise_systems(systems, list(alphas))
    options = dict(options or {})
    header = {"backbone": bb.spec, "task": task, "metric": registry("task").get(task).metric}
    setting = {"options": options, "bootstrap": {"resamples": bootstrap, "level": level, "seed": seed}}
    general_scores: dict[str, float] = {}  # by system label: the general domain's scores do not depend on `data`
    parts = []
    for spec in specs:
        scored = _score_dataset(bb, systems, task, spec, options, split, general, general_scores, batch_size, progress)
        add_intervals(scored["rows"], scored.pop("values"), header["metric"], bootstrap, level, seed)
        parts.append(scored)
    if len(parts) > 1:
        return round_percent({**header, "data": labels, **setting, "datasets": parts})
    (part,) = parts
    result = {"backbone": bb.spec, "data": part["data"], "split": part["split"], **header, "n": part["n"], **setting}
    result["rows"] = part["rows"]
    return round_percent({**result, **{k: part[k] for k in ("class_names", "general") if k in part}})


def _score_dataset(
    bb, systems, task: str, data, options, split, general, general_scores: dict[str, float], batch_size, progress
) -> dict[str, Any]:
    """One dataset's part of the result (data, split, n, rows with metrics, general and retention, class names),
    with the per-example `values` the intervals are computed from."""
    ds, used_split = load_eval_data(data, task, split)
    metric = registry("task").get(task).metric
    first = _build_task(bb, task, ds, options)
    prepared = first.prepare(bb, ds)
    gen = None
    if general is not None and any(s.label not in general_scores for s in systems):  # not scored for another `data`
        # its own classes and default prompt; a prompt ensemble applies there too
        gen_ds, _ = load_eval_data(general, task)
        gen_options = {k: v for k, v in options.items() if k not in ("class_names", "prompt")}
        gen = (gen_ds, _build_task(bb, task, gen_ds, gen_options).prepare(bb, gen_ds), gen_options)
    rows: list[dict[str, Any]] = []
    values: list[Any] = []
    for system in systems:
        if progress is not None:
            progress(system.label)
        metrics, vals = score_system(bb, system, task, ds, prepared, options, batch_size)
        row: dict[str, Any] = {**system.describe(), "metrics": metrics}
        if general is not None:
            if system.label not in general_scores:
                assert gen is not None, "loaded above for a system without a score"
                general_scores[system.label] = score_system(bb, system, task, gen[0], gen[1], gen[2], batch_size)[0][
                    metric
                ]
            row["general"] = general_scores[system.label]
            row["retention"] = (
                100.0 * row["general"] / rows[0]["general"]
                if rows and rows[0]["general"]
                else (100.0 if not rows else float("nan"))
            )
        rows.append(row)
        values.append(vals)
    part: dict[str, Any] = {
        "data": data if isinstance(data, str) else str(data),
        "split": used_split,
        "n": len(ds),
        "rows": rows,
        "values": values,
    }
    names = (first.metadata().get("options") or {}).get("class_names")
    if names:
        part["class_names"] = list(names)
    if general is not None:
        part["general"] = general if isinstance(general, str) else str(general)
    return part
