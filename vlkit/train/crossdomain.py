"""Cross-domain evaluation: a model adapted on one domain scored on others, in the same table (as the
CLIP-adaptation papers report ImageNet → its variants), next to the frozen backbone's zero-shot score there.

`vlkit adapt --eval-domains D1,D2` (domains of the embedded world; `all`: every domain but the source) or, for
`--data` runs, `--eval-data SPEC,SPEC` (test sets of other datasets) make a `CrossDomain`: its targets (a label,
a data spec, the dataset) and the frozen backbone's score on each (`measure_frozen`: zero-shot, with the run's
prompt options). `score(backbone, run_dir, options)` scores one trained run on every target (`entry`, `record`
and `result_entry` put the scores into a table row, a run's metrics.json and the command's result):

- a run whose task has a trained head (the linear probes, full fine-tuning's and the single adapter run's linear
  head) on a target with the same class names (sketch ↔ photo; ImageNet → ImageNet-Sketch) keeps that head: the
  domain shift alone (the task is rebuilt from the run's `task.json` and `head.safetensors`);
- otherwise the run's backbone (its adapters active) classifies the target zero-shot: a fresh task with the
  target's class names and the run's prompt options (`baselines.score_on`), as the frozen score is taken. A linear
  probe leaves the backbone frozen, so on a target with other classes it scores what the frozen backbone does.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..compose.predict import load_task
from ..data.api import load_data, parse_data_spec
from ..errors import ConfigError
from .baselines import score_on
from .evaluate import load_eval_data


@dataclass
class Target:
    """One evaluation domain: its label in tables and JSON, its data spec, the loaded test set."""

    label: str
    spec: Any
    ds: Any = None


@dataclass
class CrossDomain:
    """The targets a run is scored on besides its own test set, the task they are scored for, and the shot count
    a few-shot protocol scores them at (its largest)."""

    task: str
    targets: list[Target] = field(default_factory=list)
    shots: int | None = None
    frozen: dict[str, float] = field(default_factory=dict)

    @property
    def labels(self) -> list[str]:
        return [t.label for t in self.targets]

    def load(self) -> CrossDomain:
        """Load every target's test set: a spec given as a mapping as it is, a spec string's test split where it
        has one (all of it otherwise)."""
        for t in self.targets:
            if t.ds is None and isinstance(t.spec, dict):
                t.ds = load_data({"task": self.task, **t.spec})
            elif t.ds is None:
                t.ds, _ = load_eval_data(t.spec, self.task)
        return self

    def measure_frozen(self, backbone, options: dict[str, Any]) -> dict[str, float]:
        """The frozen `backbone`'s zero-shot score on each target with the prompt `options`; kept in `frozen`."""
        self.load()
        self.frozen = {t.label: score_on(backbone, self.task, t.ds, options) for t in self.targets}
        return dict(self.frozen)

    def score(self, backbone, run_dir: str | Path | None, options: dict[str, Any]) -> dict[str, float]:
        """A trained run's score on each target: its own head where the target has its classes, else the zero-shot
        score of its backbone (module docstring)."""
        self.load()
        task = _run_task(backbone, run_dir)
        trained = task is not None and any(True for _ in task.head.parameters())
        names = list((task.metadata().get("options") or {}).get("class_names") or []) if trained else []
        out: dict[str, float] = {}
        for t in self.targets:
            if trained and names and _class_names(t.ds) == names:
                with torch.no_grad():
                    out[t.label] = float(task.evaluate(backbone, task.prepare(backbone, t.ds))[task.metric])
            else:
                out[t.label] = score_on(backbone, self.task, t.ds, options)
        return out

    def entry(self, backbone, run_dir, options: dict[str, Any] | None) -> dict[str, Any]:
        """A table row's `cross` entry: {"cross": the run's score per target} ({} without targets)."""
        return {"cross": self.score(backbone, run_dir, options or {})} if self.targets else {}

    def frozen_entry(self, backbone=None, options: dict[str, Any] | None = None) -> dict[str, Any]:
        """The frozen backbone's row entry {"cross": ...} ({} without targets), measured first when `backbone`
        (the frozen one) is given."""
        if not self.targets:
            return {}
        if backbone is not None:
            self.measure_frozen(backbone, options or {})
        return {"cross": dict(self.frozen)}

    def result_entry(self) -> dict[str, Any]:
        """The result's {"cross_domain": `describe()`} ({} without targets)."""
        return {"cross_domain": self.describe()} if self.targets else {}

    def record(self, scores: dict[str, float] | None) -> dict[str, Any]:
        """What a run's metrics.json records: {"cross_domain": {label: {"accuracy", "frozen"}}} ({} without
        targets or scores)."""
        if not self.targets or not scores:
            return {}
        return {
            "cross_domain": {
                label: {"accuracy": scores.get(label), "frozen": self.frozen.get(label)} for label in self.labels
            }
        }

    def describe(self) -> dict[str, Any]:
        """The result's `cross_domain` entry: the targets' data, the frozen scores and the shot count."""
        return {
            "targets": self.labels,
            "data": {t.label: t.spec if isinstance(t.spec, str) else dict(t.spec) for t in self.targets},
            "frozen": dict(self.frozen),
            **({"shots": self.shots} if self.shots is not None else {}),
        }


def _class_names(ds) -> list[str] | None:
    feat = ds.features.get("label") if hasattr(ds, "features") else None
    names = getattr(feat, "names", None)
    return list(names) if names else None


def _run_task(backbone, run_dir):
    """The task a run wrote (task.json, with head.safetensors when it has a trained head), or None."""
    if run_dir is None:
        return None
    meta_file = Path(run_dir) / "task.json"
    if not meta_file.is_file():
        return None
    head = Path(run_dir) / "head.safetensors"
    return load_task(backbone, json.loads(meta_file.read_text(encoding="utf-8")), head if head.is_file() else None)


def split_list(text: str | list[str] | tuple[str, ...] | None, flag: str) -> list[str]:
    """'a,b' (or a list of such strings) -> ['a', 'b']; a ConfigError naming `flag` for an empty or repeated item."""
    if text is None:
        return []
    parts = [text] if isinstance(text, str) else list(text)
    items = [p.strip() for part in parts for p in str(part).split(",")]
    if not items or any(not p for p in items):
        raise ConfigError(f"{flag} takes comma-separated names, got {text!r}")
    dup = next((p for p in items if items.count(p) > 1), None)
    if dup is not None:
        raise ConfigError(f"{flag} names {dup!r} twice")
    return items


def domain_targets(
    domains, *, source: str, known: tuple[str, ...], spec: dict[str, Any], task: str, shots: int | None = None
) -> CrossDomain:
    """Targets of generated domains (`--eval-domains`): each domain in `domains` (`all`: every known domain but
    `source`) as `spec` with its `domain` set. A ConfigError for an unknown domain or the source itself."""
    names = split_list(domains, "--eval-domains")
    if names == ["all"]:
        names = [d for d in known if d != source]
    for d in names:
        if d not in known:
            raise ConfigError(f"--eval-domains: unknown domain {d!r}; known: {', '.join(known)} (or all)")
        if d == source:
            raise ConfigError(f"--eval-domains: {d!r} is the domain the run adapts to (its own test set is scored)")
    return CrossDomain(task, [Target(d, {**spec, "domain": d}) for d in names], shots)


def data_targets(specs, *, source: Any = None, task: str, shots: int | None = None) -> CrossDomain:
    """Targets of data specs (`--eval-data`): each spec's test split (all of it where there is none)."""
    items = split_list(specs, "--eval-data")
    for item in items:
        parse_data_spec(item)  # a malformed spec fails here, before any run
        if source is not None and item == source:
            raise ConfigError(f"--eval-data: {item!r} is the run's own data (its test set is scored)")
    return CrossDomain(task, [Target(item, item) for item in items], shots)
