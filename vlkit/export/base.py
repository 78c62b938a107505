"""The exporter interface: what an export target (ONNX, or a third party's) is given and what it returns.

`vlkit export` prepares everything that does not depend on the target: the backbone with its adapters
loaded (LoRA-like adapters folded into the weights), the task head, the graphs to write as plain
`nn.Module`s with example inputs and named, batch-dynamic inputs and outputs, fresh random and real
verification inputs with a PyTorch reference for each, and the eval set. The exporter named by
`--target` receives that as an `ExportRequest`, writes its files into `request.staging` and returns an
`ExportResult`: the files, one `Check` per graph, precision, input set and output, and the eval-set
scores. The driver fails the export when a required check is out of tolerance; otherwise it moves the
files into the output directory and writes `export.json`.

A third-party target registers the same way as the built-in `onnx` one:

    from vlkit.hookspecs import hookimpl

    @hookimpl
    def register_exporters(register):
        register("coreml", CoreMLExporter(), "Core ML packages for Apple devices")

where `CoreMLExporter` subclasses `vlkit.export.base.Exporter`. A target's own options (`--option key=value`,
`ExportOptions.extra`) are one dataclass with field help, its `options_cls`: `target_options` checks and types
them, and `vlkit plugins --json` lists them.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import ConfigError
from ..options import OptionSpec, option_specs

FP32_TOLERANCE = 1e-4  # max abs difference allowed for fp32 graphs, in cosine units
FP16_TOLERANCE = 2e-2  # the same for fp16 graphs (reported and enforced, but looser)


@dataclass
class ExportOptions:
    """What the user asked for; `extra` holds target-specific `--option key=value` pairs."""

    fp16: bool = False
    quantize: str | None = None
    providers: list[str] | None = None
    opset: int | None = None
    seed: int | None = None  # random verification inputs; None: a fresh seed, recorded in export.json
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class GraphSpec:
    """One graph to export.

    `module(*inputs)` (inputs in `inputs` order) returns the outputs in `outputs` order (a tensor when
    there is one). `reference` computes the same outputs the way vlkit computes them (adapters unmerged,
    class embeddings recomputed): exporters compare against it. `scale` says in which units an output's
    differences are judged: 1 for normalised embeddings, the logit scale for logits and pair scores.
    """

    name: str
    module: nn.Module
    inputs: dict[str, torch.Tensor]
    outputs: list[str]
    dynamic_axes: dict[str, dict[int, str]]
    reference: nn.Module | None = None
    scale: dict[str, float] = field(default_factory=dict)
    description: str = ""

    def io(self) -> dict[str, list[dict[str, Any]]]:
        """Names, dtypes and shapes (batch as "batch") of the inputs and outputs, for export.json."""

        def shape(name, t):
            dims = list(t.shape) if t is not None else []
            for axis, label in self.dynamic_axes.get(name, {}).items():
                if axis < len(dims):
                    dims[axis] = label
            return dims

        ins = [
            {"name": n, "dtype": str(t.dtype).replace("torch.", ""), "shape": shape(n, t)}
            for n, t in self.inputs.items()
        ]
        outs = [{"name": n, "dtype": "float32", "shape": ["batch", "..."]} for n in self.outputs]
        return {"inputs": ins, "outputs": outs}

    def tolerance(self, output: str, precision: str) -> float | None:
        """Allowed max abs difference for `output` at `precision` (None: reported, not enforced)."""
        base = {"fp32": FP32_TOLERANCE, "fp16": FP16_TOLERANCE}.get(precision)
        if base is None:
            return None
        return base * max(1.0, float(self.scale.get(output, 1.0)))


@dataclass
class Check:
    """One verification: a graph at a precision on an input set, one output, against PyTorch."""

    graph: str
    precision: str
    inputs: str
    output: str
    batch: int
    max_abs_diff: float
    tolerance: float | None
    provider: str = ""

    @property
    def required(self) -> bool:
        return self.tolerance is not None

    @property
    def passed(self) -> bool:
        if self.tolerance is None:
            return True
        return math.isfinite(self.max_abs_diff) and self.max_abs_diff <= self.tolerance

    def to_dict(self) -> dict[str, Any]:
        return {
            "graph": self.graph,
            "precision": self.precision,
            "inputs": self.inputs,
            "output": self.output,
            "batch": self.batch,
            "max_abs_diff": self.max_abs_diff,
            "tolerance": self.tolerance,
            "required": self.required,
            "passed": self.passed,
            "provider": self.provider,
        }


@dataclass
class ExportResult:
    """What an exporter wrote and measured. `files`: {"graph", "precision", "file"} per written file
    (paths relative to the staging directory); `scores`: eval-set scores per precision; `manifest`:
    target-specific fields for export.json (runtime versions, opset, session hints)."""

    files: list[dict[str, Any]] = field(default_factory=list)
    checks: list[Check] = field(default_factory=list)
    scores: list[dict[str, Any]] = field(default_factory=list)
    manifest: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)  # seconds per phase (trace, verify, ...), optional

    @property
    def failed(self) -> list[Check]:
        return [c for c in self.checks if not c.passed]


def input_key(inputs: dict[str, Any]) -> tuple:
    """What identifies a set of inputs without reading it: per name, the memory address, shape, dtype and
    strides (in elements) of the tensor or array, so a numpy view of a tensor has the tensor's key. Callers
    that cache by it keep the inputs alive beside the entry (an address is only unique while it is in use)."""
    out = []
    for name, v in inputs.items():
        if isinstance(v, torch.Tensor):
            out.append(
                (
                    name,
                    v.device.type,
                    v.data_ptr(),
                    tuple(v.shape),
                    str(v.dtype).replace("torch.", ""),
                    tuple(v.stride()),
                )
            )
        else:
            a = np.asarray(v)
            strides = tuple(st // a.itemsize for st in a.strides) if a.itemsize else ()
            out.append((name, "cpu", a.__array_interface__["data"][0], a.shape, a.dtype.name, strides))
    return tuple(out)


class Evaluation:
    """The eval set and how a graph's outputs become its score (exporter-neutral).

    `score(run)` takes `run(graph_name, {input_name: np.ndarray}) -> {output_name: np.ndarray}` for one
    precision of the exported graphs and returns the metric on the eval set plus the agreement of the
    predictions with PyTorch's. `run` is called with whole input sets (the eval set, the class prompts), the
    same arrays the `real` verification inputs hold, so an exporter that caches its outputs by `input_key`
    computes each once. `reference_score` is what vlkit itself measures: `reference_predictions` (an array),
    or `reference_run` (a `run` over the PyTorch references), evaluated on first use.
    """

    def __init__(
        self,
        metric: str,
        dataset: str,
        graph: str,
        predict: Callable,
        reference_predictions: np.ndarray | None,
        labels: np.ndarray,
        reference_run: Callable | None = None,
    ):
        self.metric = metric
        self.dataset = dataset
        self.graph = graph
        self._predict = predict
        self._reference_predictions = reference_predictions
        self._reference_run = reference_run
        self.labels = labels

    @property
    def reference_predictions(self) -> np.ndarray:
        if self._reference_predictions is None:
            self._reference_predictions = np.asarray(self._predict(self._reference_run))
        return self._reference_predictions

    @property
    def reference_score(self) -> float:
        return accuracy(self.reference_predictions, self.labels)

    def score(self, run: Callable[[str, dict[str, np.ndarray]], dict[str, np.ndarray]]) -> dict[str, Any]:
        pred = self._predict(run)
        value = accuracy(pred, self.labels)
        agree = float(100.0 * np.mean(pred == self.reference_predictions)) if len(pred) else float("nan")
        return {
            "metric": self.metric,
            "value": value,
            "pytorch": self.reference_score,
            "delta": value - self.reference_score,
            "agreement": agree,
            "n": int(len(pred)),
        }


def accuracy(pred: np.ndarray, labels: np.ndarray) -> float:
    """Percent of predictions equal to the label (labels of -1 count as misses)."""
    if len(labels) == 0:
        return float("nan")
    return float(100.0 * np.mean(np.asarray(pred) == np.asarray(labels)))


@dataclass
class ExportRequest:
    """Everything an exporter needs; the driver fills it and owns the output directory."""

    backbone: Any
    graphs: list[GraphSpec]
    verify_inputs: dict[str, dict[str, dict[str, torch.Tensor]]]  # graph -> input set -> tensors
    reference: Callable[[GraphSpec, dict[str, torch.Tensor]], dict[str, np.ndarray]]
    evaluation: Evaluation | None
    options: ExportOptions
    staging: Path
    describe: dict[str, Any] = field(default_factory=dict)  # what export.json says about model and adapters

    def graph(self, name: str) -> GraphSpec:
        for g in self.graphs:
            if g.name == name:
                return g
        raise KeyError(name)


class Exporter(ABC):
    """An export target. Subclasses set `name` and `summary` and implement `check` and `export`; one with
    target options (`--option key=value`) declares them as a dataclass, `options_cls`."""

    name: str = ""
    summary: str = ""
    options_cls: type | None = None

    def target_options(self, extra: dict[str, Any]) -> dict[str, Any]:
        """`extra` (`--option` pairs) checked against `options_cls`: a key it does not declare is a ConfigError
        naming the declared ones; text values of int, float and bool options become numbers and booleans.
        Without `options_cls`, `extra` unchanged."""
        if self.options_cls is None:
            return dict(extra)
        specs = {s.name: s for s in option_specs(self.options_cls)}
        out: dict[str, Any] = {}
        for key, value in extra.items():
            if key not in specs:
                raise ConfigError(f"unknown {self.name} export option {key!r}; options: {', '.join(specs)}")
            out[key] = _typed(specs[key], value, f"{self.name} option {key}")
        return out

    def check(self, options: ExportOptions) -> None:  # noqa: B027 - optional: by default every option is honoured
        """Reject options this target cannot honour (a ConfigError), before any model is loaded."""

    @abstractmethod
    def export(self, request: ExportRequest) -> ExportResult:
        """Write the graphs of `request` into `request.staging`, verify them, and report."""


def _typed(spec: OptionSpec, value: Any, what: str) -> Any:
    kind = spec.type.replace(" | None", "")
    if value is None and spec.type.endswith("| None"):
        return None
    if kind == "bool":
        if isinstance(value, str):
            if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ConfigError(f"{what} must be true or false, got {value!r}")
            return value.lower() in ("true", "1", "yes")
        return bool(value)
    if kind in ("int", "float"):
        wrong = ConfigError(f"{what} must be {'an integer' if kind == 'int' else 'a number'}, got {value!r}")
        try:
            number = int(value) if kind == "int" else float(value)
        except (TypeError, ValueError):
            raise wrong from None
        if isinstance(value, bool) or (kind == "int" and isinstance(value, float) and value != number):
            raise wrong
        return number
    return value
