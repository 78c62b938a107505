"""onnxruntime verification of exported graphs: parity with PyTorch and the eval-set score per precision.

Every graph is run in a fresh onnxruntime session on the requested execution providers, on fresh random
inputs (a batch size other than the one it was traced with) and on real inputs (the eval set's images,
the class prompts), in chunks, and each output is compared with the PyTorch reference (adapters
unmerged, as vlkit runs them). Max abs differences are judged in cosine units: normalised embeddings as
they are, logits and pair scores relative to the logit scale. fp32 must agree within 1e-4, fp16 within
2e-2; int8 (dynamic quantisation) differences are reported, with the change of the eval-set score.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigError, ExportError
from .base import Check, ExportRequest, GraphSpec, input_key

CHUNK = 64
# onnxruntime's NCHWc layout transformer crashes (SIGSEGV) building a CPU session for float16 convolutions.
FP16_DISABLED_OPTIMIZERS = ("NchwcTransformer",)


def available_providers() -> list[str]:
    import onnxruntime as ort

    return list(ort.get_available_providers())


def _gpu_present() -> bool:
    """onnxruntime-gpu lists CUDA even on machines without a GPU; ask torch whether there is one."""
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:  # a broken CUDA setup means: no GPU to use
        return False


def resolve_providers(requested: list[str] | None) -> list[str]:
    """The providers to run with: the requested ones (checked), else CUDA when present, CPU always last."""
    available = available_providers()
    if requested:
        unknown = [p for p in requested if p not in available]
        if unknown:
            hint = (
                "install onnxruntime-gpu (pip install 'vlkit[gpu]') for CUDAExecutionProvider"
                if "CUDAExecutionProvider" in unknown
                else None
            )
            raise ConfigError(
                f"execution provider(s) {', '.join(unknown)} not available in this onnxruntime; "
                f"available: {', '.join(available)}",
                hint=hint,
            )
        chosen = list(dict.fromkeys(requested))
    else:
        chosen = ["CUDAExecutionProvider"] if "CUDAExecutionProvider" in available and _gpu_present() else []
    if "CPUExecutionProvider" not in chosen and "CPUExecutionProvider" in available:
        chosen.append("CPUExecutionProvider")
    return chosen


def session_hints(precision: str) -> dict[str, Any]:
    """Session settings a consumer should use for a graph of this precision (recorded in export.json)."""
    if precision == "fp16":
        return {"disabled_optimizers": list(FP16_DISABLED_OPTIMIZERS)}
    return {}


def make_session(path: str | Path, providers: list[str], precision: str = "fp32", threads: int = 0):
    """An onnxruntime session for one graph (fp32 on CUDA without TF32, so parity is meaningful)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    kwargs: dict[str, Any] = {}
    if precision == "fp16":
        kwargs["disabled_optimizers"] = list(FP16_DISABLED_OPTIMIZERS)
    plain = list(providers)
    with_opts: list[Any] = [
        ("CUDAExecutionProvider", {"use_tf32": "0"}) if p == "CUDAExecutionProvider" and precision == "fp32" else p
        for p in providers
    ]
    try:
        return ort.InferenceSession(str(path), so, providers=with_opts, **kwargs)
    except Exception as first:  # an onnxruntime without the use_tf32 option: plain providers
        if with_opts == plain:
            raise ExportError(f"onnxruntime cannot load {Path(path).name}: {first}") from None
        try:
            return ort.InferenceSession(str(path), so, providers=plain, **kwargs)
        except Exception as exc:
            raise ExportError(f"onnxruntime cannot load {Path(path).name}: {exc}") from None


def run_chunked(sess, inputs: dict[str, np.ndarray], chunk: int = CHUNK) -> dict[str, np.ndarray]:
    """Run `sess` on inputs split into batches of `chunk`; outputs concatenated, by name."""
    names = [o.name for o in sess.get_outputs()]
    n = len(next(iter(inputs.values())))
    parts: dict[str, list[np.ndarray]] = {k: [] for k in names}
    for i in range(0, n, chunk):
        outs = sess.run(names, {k: v[i : i + chunk] for k, v in inputs.items()})
        for k, o in zip(names, outs):
            parts[k].append(np.asarray(o))
    return {k: np.concatenate(v) for k, v in parts.items()}


def _numpy(tensors) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy() for k, v in tensors.items()}


def max_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    if a.shape != b.shape:
        return float("inf")
    if a.size == 0:
        return 0.0
    d = np.abs(a.astype(np.float64) - b.astype(np.float64))
    return float("inf") if not np.isfinite(d).all() else float(d.max())


class Verifier:
    """Sessions per (graph, precision), PyTorch references cached per (graph, input set), and each graph's
    outputs cached per (precision, inputs): the eval-set score reads the outputs the `real` checks computed,
    so every input set goes through each graph once."""

    def __init__(self, request: ExportRequest, providers: list[str], threads: int = 0):
        self.request = request
        self.providers = providers
        self.threads = threads
        self._refs: dict[tuple[str, str], dict[str, np.ndarray]] = {}
        self._sessions: dict[tuple[str, str], Any] = {}
        self._outputs: dict[tuple, tuple[dict[str, np.ndarray], dict[str, np.ndarray]]] = {}
        self.files: dict[tuple[str, str], Path] = {}

    def run(self, graph: str, precision: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Outputs of `graph` at `precision` on `inputs` (computed once per input set)."""
        key = (graph, precision, input_key(inputs))
        if key not in self._outputs:  # the inputs are kept with the entry, so their addresses stay theirs
            self._outputs[key] = (inputs, run_chunked(self.session(graph, precision), inputs))
        return self._outputs[key][1]

    def add(self, graph: str, precision: str, path: Path) -> None:
        self.files[(graph, precision)] = path

    def session(self, graph: str, precision: str):
        key = (graph, precision)
        if key not in self._sessions:
            self._sessions[key] = make_session(self.files[key], self.providers, precision, self.threads)
        return self._sessions[key]

    def reference(self, graph: GraphSpec, set_name: str) -> dict[str, np.ndarray]:
        key = (graph.name, set_name)
        if key not in self._refs:
            self._refs[key] = self.request.reference(graph, self.request.verify_inputs[graph.name][set_name])
        return self._refs[key]

    def check(self, graph: GraphSpec, precision: str) -> list[Check]:
        sess = self.session(graph.name, precision)
        provider = sess.get_providers()[0] if sess.get_providers() else ""
        checks = []
        for set_name, tensors in self.request.verify_inputs[graph.name].items():
            ref = self.reference(graph, set_name)
            got = self.run(graph.name, precision, _numpy(tensors))
            batch = len(next(iter(tensors.values())))
            for out in graph.outputs:
                checks.append(
                    Check(
                        graph.name,
                        precision,
                        set_name,
                        out,
                        batch,
                        max_abs_diff(got[out], ref[out]),
                        graph.tolerance(out, precision),
                        provider,
                    )
                )
        return checks

    def check_all(self) -> list[Check]:
        checks: list[Check] = []
        for graph, precision in self.files:
            checks.extend(self.check(self.request.graph(graph), precision))
        return checks

    def scores(self, precisions: list[str]) -> list[dict[str, Any]]:
        """The eval-set score of PyTorch and of the graphs at each precision."""
        ev = self.request.evaluation
        if ev is None:
            return []
        rows = [
            {
                "precision": "pytorch",
                "metric": ev.metric,
                "value": ev.reference_score,
                "pytorch": ev.reference_score,
                "delta": 0.0,
                "agreement": 100.0,
                "n": int(len(ev.labels)),
            }
        ]
        for precision in precisions:

            def run(graph: str, inputs: dict[str, np.ndarray], _p=precision) -> dict[str, np.ndarray]:
                return self.run(graph, _p, inputs)

            rows.append({"precision": precision, **ev.score(run)})
        return rows
