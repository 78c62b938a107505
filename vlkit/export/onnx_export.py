"""The built-in `onnx` export target: TorchScript-traced ONNX graphs, fp16 and int8 variants, checked with onnxruntime.

Files (in the output directory):

- `image_encoder.onnx`: `pixel_values` float32 [batch, 3, S, S] -> `image_embeds` float32 [batch, D] (L2-normalised)
- `text_encoder.onnx`: `input_ids` int64 [batch, context] -> `text_embeds` float32 [batch, D] (L2-normalised)
- `classifier.onnx` (task classification): `pixel_values` -> `logits` [batch, C]; the class-text embedding matrix
  (text head) or the trained linear head is baked in
- `pair_scorer.onnx` (fusion adapters): `pixel_values`, `input_ids` -> `scores` [batch] (image i with text i),
  and the fused `image_embeds`, `text_embeds`
- `<graph>.fp16.onnx` with `fp16`: computed in float16, float32 inputs and outputs
- `<graph>.int8.onnx` with `quantize="int8"`: onnxruntime dynamic quantisation (int8 weights of MatMul/Gemm)

LoRA-like adapters arrive merged into the weights; other adapters are traced as the operators they run.
The legacy TorchScript exporter (`dynamo=False`) is used: it needs no package beyond torch and onnx.
Target options (`--option key=value`): `threads` (onnxruntime intra-op threads for verification),
`per_channel` (per-channel int8 weights).
"""

from __future__ import annotations

import copy
import logging
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError, ExportError
from .base import Exporter, ExportOptions, ExportRequest, ExportResult, GraphSpec
from .model import HalfPrecision
from .verify import Verifier, resolve_providers, session_hints

DEFAULT_OPSET = 17
MIN_OPSET = 14  # scaled_dot_product_attention
QUANTIZE = ("int8",)


@dataclass
class OnnxOptions:
    """The `onnx` target's own options (`vlkit export --option key=value`)."""

    threads: int = 0
    """onnxruntime intra-op threads while verifying (>= 0; 0: onnxruntime's default)."""
    per_channel: bool = False
    """int8 (--quantize int8): quantise weights per output channel instead of per tensor."""


def max_opset() -> int:
    try:
        from torch.onnx._constants import ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET

        return int(ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET)
    except ImportError:  # pragma: no cover - other torch layouts
        return 18


@contextmanager
def _quiet_export():
    """No MHA fast path (its fused kernel has no ONNX form) and no exporter chatter."""
    mha = getattr(torch.backends, "mha", None)
    previous = mha.get_fastpath_enabled() if mha is not None else None
    if mha is not None:
        mha.set_fastpath_enabled(False)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        if mha is not None:
            mha.set_fastpath_enabled(previous)


def export_graph(module: torch.nn.Module, graph: GraphSpec, path: Path, opset: int) -> None:
    """Trace `module` with the graph's example inputs into an ONNX file at `path`, and check it."""
    import onnx

    module.eval()
    try:
        with _quiet_export(), torch.no_grad():
            torch.onnx.export(
                module,
                tuple(graph.inputs.values()),
                str(path),
                dynamo=False,
                input_names=list(graph.inputs),
                output_names=list(graph.outputs),
                dynamic_axes=graph.dynamic_axes,
                opset_version=opset,
                do_constant_folding=True,
            )
    except Exception as exc:  # tracing / symbolic errors of arbitrary type
        raise ExportError(
            f"could not export the {graph.name} graph to ONNX: {type(exc).__name__}: {exc}",
            hint="an adapter variant may use an operation without an ONNX form",
        ) from None
    try:
        onnx.checker.check_model(str(path))
    except Exception as exc:
        raise ExportError(f"the exported {graph.name} graph is not valid ONNX: {exc}") from None


def fix_mixed_layernorm(path: Path) -> int:
    """Cast LayerNormalization scale/bias to the input's type where they differ; returns how many.

    PyTorch runs a float16 LayerNorm on float32 input (e.g. after a float32 attention mask promoted the
    residual stream) in float32; ONNX's LayerNormalization needs one type, so the cast says the same.
    """
    import onnx
    from onnx import helper

    model = onnx.load(str(path))
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # inference is best effort: without types there is nothing to fix
        return 0
    types = {
        vi.name: vi.type.tensor_type.elem_type
        for vi in (*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output)
    }
    types.update({t.name: t.data_type for t in model.graph.initializer})
    for node in model.graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            types[node.output[0]] = node.attribute[0].t.data_type
    nodes, fixed = [], 0
    for node in model.graph.node:
        if node.op_type == "LayerNormalization":
            tx = types.get(node.input[0])
            for i in (1, 2):
                if i < len(node.input) and node.input[i] and tx and types.get(node.input[i]) not in (None, tx):
                    cast = f"{node.input[i]}_as_{tx}_{fixed}"
                    nodes.append(helper.make_node("Cast", [node.input[i]], [cast], to=tx, name=f"vlkit_cast_{fixed}"))
                    node.input[i] = cast
                    fixed += 1
        nodes.append(node)
    if fixed:
        del model.graph.node[:]
        model.graph.node.extend(nodes)
        onnx.save(model, str(path))
    return fixed


def quantize_int8(src: Path, dest: Path, per_channel: bool = False) -> None:
    """onnxruntime dynamic quantisation: int8 weights, activations quantised on the fly."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # quantize_dynamic logs a pre-processing suggestion on the root logger
    try:
        quantize_dynamic(str(src), str(dest), weight_type=QuantType.QInt8, per_channel=per_channel)
    except Exception as exc:
        raise ExportError(f"int8 quantisation of {src.name} failed: {exc}") from None
    finally:
        root.setLevel(level)


class OnnxExporter(Exporter):
    name = "onnx"
    summary = "ONNX graphs (fp32, fp16, int8) verified with onnxruntime on CPU or CUDA"
    options_cls = OnnxOptions

    def target_options(self, extra: dict[str, Any]) -> dict[str, Any]:
        out = super().target_options(extra)
        if out.get("threads", 0) < 0:
            raise ConfigError(f"onnx option threads must be >= 0, got {extra['threads']!r}")
        return out

    def check(self, options: ExportOptions) -> None:

        if options.quantize is not None and options.quantize not in QUANTIZE:
            raise ConfigError(f"--quantize {options.quantize!r} is not supported; choose: {', '.join(QUANTIZE)}")
        top = max_opset()
        if options.opset is not None and not MIN_OPSET <= options.opset <= top:
            raise ConfigError(f"--opset must be between {MIN_OPSET} and {top}, got {options.opset}")
        self.target_options(options.extra)
        resolve_providers(options.providers)

    def export(self, request: ExportRequest) -> ExportResult:
        import onnx
        import onnxruntime as ort

        opts = request.options
        extra = self.target_options(opts.extra)
        opset = opts.opset or DEFAULT_OPSET
        providers = resolve_providers(opts.providers)
        staging = request.staging
        result = ExportResult()
        verifier = Verifier(request, providers, threads=extra.get("threads", 0))

        def record(graph: str, precision: str, path: Path) -> None:
            verifier.add(graph, precision, path)
            result.files.append(
                {
                    "graph": graph,
                    "precision": precision,
                    "file": path.name,
                    "bytes": path.stat().st_size,
                    "session": session_hints(precision),
                }
            )

        import time

        t = time.perf_counter()
        for g in request.graphs:  # each graph traced once per precision; verification reuses its inputs
            path = staging / f"{g.name}.onnx"
            export_graph(g.module, g, path, opset)
            record(g.name, "fp32", path)
        precisions = ["fp32"]
        if opts.fp16:
            half_modules = copy.deepcopy([g.module for g in request.graphs])  # one shared backbone copy
            for g, m in zip(request.graphs, half_modules):
                path = staging / f"{g.name}.fp16.onnx"
                export_graph(HalfPrecision(m), g, path, opset)
                fix_mixed_layernorm(path)
                record(g.name, "fp16", path)
            del half_modules
            precisions.append("fp16")
            if providers[0] == "CPUExecutionProvider":
                result.notes.append(
                    "fp16 graphs on CPUExecutionProvider run without onnxruntime's NCHWc layout "
                    "optimiser (it crashes on float16 convolutions); they are meant for GPUs"
                )
        if opts.quantize == "int8":
            for g in request.graphs:
                path = staging / f"{g.name}.int8.onnx"
                quantize_int8(staging / f"{g.name}.onnx", path, per_channel=extra.get("per_channel", False))
                record(g.name, "int8", path)
            precisions.append("int8")

        result.timings["trace"] = time.perf_counter() - t
        t = time.perf_counter()
        result.checks = verifier.check_all()
        result.scores = verifier.scores(precisions)
        result.timings["verify"] = time.perf_counter() - t
        result.manifest = {
            "runtime": {
                "onnx": onnx.__version__,
                "onnxruntime": ort.__version__,
                "torch": torch.__version__.split("+")[0],
                "opset": opset,
                "verified_providers": providers,
            }
        }
        return result
