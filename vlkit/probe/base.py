"""The probe interface shared by built-in and third-party probes, and the result every probe returns.

A probe is an object with a ``name``, a one-line ``summary`` and a ``run`` method; plugins register one
through the ``register_probes`` hook::

    @dataclass
    class MyOptions(ProbeOptions):
        batch_size: int = 64
        \"\"\"Examples scored per batch.\"\"\"

    class MyProbe(Probe):
        name = "my-probe"
        summary = "what it measures"
        options_cls = MyOptions  # `vlkit probe` passes only these; `vlkit plugins --json` lists them

        def run(self, backbone, systems, *, data=None, seed=0, n=None, n_boot=1000, level=0.95, batch_size=64):
            ...score each system with vlkit.probe.systems.score_examples...
            return build_result(self, backbone, systems, dataset="my-data", ...)

    @hookimpl
    def register_probes(register):
        register("my-probe", MyProbe(), summary="what it measures")

``systems`` is the list of :class:`vlkit.probe.systems.System` to compare: the frozen backbone first, then
each adapter configuration. The result is a plain dict (JSON-ready apart from ``per_example``)::

    {"probe", "dataset", "backbone", "adapters": [labels], "n", "metrics": [...], "primary": metric,
     "chance": {metric: %}, "bootstrap": {"resamples", "seed", "level"},
     "systems": [{"label", "adapters", "mode", "weights",
                  "scores": {metric: {"value", "low", "high"}},
                  "diff": None | {metric: {"value", "low", "high", "p_le_0"}},   # vs the first system
                  "breakdowns": {key: {tag: {"n", metric: %, "ci": {metric: [low, high]},
                                             "diff": {metric: {...}} (systems after the first)}}}}],
     "per_example": {"ids": [...], "scores": {label: nested lists}, "keys": [...]}}

Values are percentages; ``diff`` holds the paired bootstrap interval of (system − first system).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import UnknownNameError
from ..plugins import registry
from . import metrics as M

DEFAULT_RESAMPLES = 1000


@dataclass
class ProbeOptions:
    """The options every probe's `run` takes (`vlkit probe`'s shared flags); a probe's `options_cls` subclasses
    this with its own (`data_seed`, `batch_size`, ...), each a keyword parameter of its `run`."""

    data: Any = None
    """The probe's data (--data; what it may be is the probe's `data_help`); None: its `default_data`."""
    seed: int = 0
    """Seed of the bootstrap resamples (--seed)."""
    n: int | None = None
    """Examples to score (-n; generated, the first n or a seeded subset, as the probe says); None: all."""
    n_boot: int = DEFAULT_RESAMPLES
    """Bootstrap resamples for the confidence intervals (--bootstrap, >= 1)."""
    level: float = 0.95
    """Confidence level of the intervals (--level, in (0, 1))."""


class Probe(ABC):
    """Base class of diagnostic probes: a registered probe is a subclass (or an instance of one)."""

    name: str = ""
    summary: str = ""
    #: what --data means for this probe, shown by `vlkit probe --list`
    data_help: str = ""
    #: the --data used when none is given (None: the probe needs --data)
    default_data: str | None = None
    #: the columns a dataset of this probe has (`load_data(spec, task=<probe name>)` validates them)
    required: tuple[str, ...] = ()
    #: the options `run` takes, as a `ProbeOptions` subclass with field help (None: `run`'s signature says)
    options_cls: type | None = None

    @abstractmethod
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
        **options: Any,
    ) -> dict[str, Any]:
        """Score every system on the probe's data and return a result dict (see the module docstring)."""

    def __repr__(self) -> str:
        return f"<probe {self.name or type(self).__name__}>"


def get_probe(name: str):
    """The registered probe `name` (a registered class is instantiated)."""

    reg = registry("probe")
    if name not in reg:
        raise UnknownNameError("probe", name, reg.names())
    obj = reg.get(name)
    if isinstance(obj, type):
        obj = obj()
    if not obj.name:
        obj.name = name
    return obj


def list_probes() -> list[dict[str, str]]:
    """Every registered probe: name, plugin, summary (the summary given at registration, else the probe's)."""

    out = []
    for entry in sorted(registry("probe"), key=lambda e: e.name):
        obj = entry.obj
        summary = entry.summary or obj.summary or ""
        out.append({"name": entry.name, "plugin": entry.plugin, "summary": summary, "data": obj.data_help or ""})
    return out


# ----------------------------------------------------------------------------------------- results


def summarize(
    labels: Sequence[str],
    values: dict[str, dict[str, np.ndarray]],
    statistics: dict[str, Callable[[np.ndarray], M.Statistic]],
    n: int,
    *,
    n_boot: int = DEFAULT_RESAMPLES,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, dict[str, Any]]:
    """Point values, bootstrap intervals and paired differences to the first system.

    `values[label][metric]` is the per-example vector a metric is computed from and `statistics[metric]`
    turns such a vector into a bootstrap statistic (e.g. :func:`metrics.mean_statistic`). Every system and
    metric uses the same resample indices (drawn once from `seed`), which makes the differences paired.
    Returns ``{label: {"scores": ..., "diff": ...}}``.
    """
    idx = M.bootstrap_indices(n, n_boot, seed)
    full = np.arange(n)[None, :]
    out: dict[str, dict[str, Any]] = {}
    base = labels[0]
    for label in labels:
        scores, diff = {}, {}
        for metric, make in statistics.items():
            stat = make(values[label][metric])
            lo, hi = M.percentile_interval(stat(idx), level)
            scores[metric] = {"value": float(stat(full)[0]), "low": lo, "high": hi}
            if label != base:
                diff[metric] = M.paired_bootstrap_diff(
                    base_stat=make(values[base][metric]), other_stat=stat, indices=idx, level=level
                )
        out[label] = {"scores": scores, "diff": diff if label != base else None}
    return out


def annotate_breakdowns(
    breakdowns: dict[str, dict[str, Any]],
    groups: dict[str, dict[str, np.ndarray]],
    values: dict[str, dict[str, np.ndarray]],
    metrics: Sequence[str],
    *,
    n_boot: int = DEFAULT_RESAMPLES,
    seed: int = 0,
    level: float = 0.95,
) -> None:
    """Add bootstrap intervals to breakdown rows in place: ``row["ci"][metric] = [low, high]`` and, for every
    system after the first, ``row["diff"][metric]`` (paired interval of the difference on that subset).

    `breakdowns[label][key][tag]` are the rows, `groups[key][tag]` the example indices of each tag and
    `values[label][metric]` the per-example vectors (the tag's value is 100 × their mean on its examples).
    """
    labels = list(values)
    base = labels[0]
    for key, tags in groups.items():
        for tag, idx in tags.items():
            if len(idx) == 0:
                continue
            boot = M.bootstrap_indices(len(idx), n_boot, seed)
            for label in labels:
                row = breakdowns[label].get(key, {}).get(tag)
                if row is None:
                    continue
                sub = {m: np.asarray(values[label][m])[idx] for m in metrics}
                row["ci"] = {m: list(M.bootstrap_ci(sub[m], indices=boot, level=level)) for m in metrics}
                if label != base:
                    row["diff"] = {
                        m: M.paired_bootstrap_diff(np.asarray(values[base][m])[idx], sub[m], indices=boot, level=level)
                        for m in metrics
                    }


def build_result(
    probe,
    backbone,
    systems,
    *,
    dataset: str,
    n: int,
    metrics: Sequence[str],
    primary: str,
    chance: dict[str, float] | None,
    summary: dict[str, dict[str, Any]],
    breakdowns: dict[str, dict[str, Any]] | None = None,
    n_boot: int = DEFAULT_RESAMPLES,
    seed: int = 0,
    level: float = 0.95,
    per_example: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Assemble the result dict every probe returns (see the module docstring)."""
    rows = []
    for system in systems:
        s = summary[system.label]
        rows.append(
            {
                **system.describe(),
                "scores": s["scores"],
                "diff": s["diff"],
                "breakdowns": (breakdowns or {}).get(system.label, {}),
            }
        )
    result = {
        "probe": probe.name,
        "dataset": dataset,
        "backbone": getattr(backbone, "spec", str(backbone)),
        "adapters": [system.label for system in systems if system.names],
        "n": int(n),
        "metrics": list(metrics),
        "primary": primary,
        "chance": dict(chance or {}),
        "bootstrap": {
            "resamples": int(n_boot),
            "seed": int(seed),
            "level": float(level),
            "method": "percentile; differences paired (same resamples)",
        },
        "systems": rows,
    }
    if extra:
        result.update(extra)
    if per_example is not None:
        result["per_example"] = per_example
    return result


def public_result(result: dict[str, Any]) -> dict[str, Any]:
    """The result without its per-example arrays (what --json prints and -o writes)."""
    return {k: v for k, v in result.items() if k != "per_example"}
