"""`export_model`: the target-independent driver behind `vlkit export`.

It validates the request cheaply (target, options, adapter directories) before loading anything, loads
the backbone with its adapters, folds mergeable adapters into the weights, builds the graphs (image and
text encoders; a classifier with `task="classification"`; a joint pair scorer when a fusion adapter is
active), the verification inputs (fresh random ones and real ones from the eval set) and the eval set
itself, then lets the exporter write and verify into a staging directory beside the output directory
(`vlkit.outputs`). Only when every required check passes does the staging directory replace the output
directory, in one rename; otherwise nothing is left behind and an `ExportError` says what differed.
"""

from __future__ import annotations

import dataclasses
import os
import re
import secrets
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vlkit.backbones.loading import load_backbone

from .. import __version__
from ..adapters.model import AdaptedModel
from ..data.api import load_data, parse_data_spec
from ..data.kinds import kind_domains
from ..data.pipeline import materialize
from ..errors import ConfigError, ExportError, VlkitError
from ..io import write_json
from ..outputs import OutputTarget
from ..plugins import registry
from .base import Evaluation, ExportOptions, ExportRequest, ExportResult, GraphSpec, input_key
from .generative import export_generative
from .model import (
    Classifier,
    ImageEncoder,
    PairScorer,
    TextEncoder,
    build_task,
    exportable_tasks,
    load_sources,
    merge_where_possible,
    read_source,
    recipe_data,
    recipe_domain,
    task_source,
    unmerged,
)

WORLD_KIND = "world"  # the dataset kind `--domain` names a domain of (evaluated on when no other eval set is known)
DEFAULT_DOMAIN = "photo"
BATCH = 64  # chunk size for references and eval-set passes
EVAL_N = 16  # default eval-set size of an fp32 export: its parity checks decide, the score only confirms
EVAL_N_LOW_PRECISION = 256  # default with fp16 / int8 graphs, whose eval-set score change is what they are judged by
FORMAT = "vlkit.export"
FORMAT_VERSION = 1


def get_exporter(target: str):

    return registry("exporter").get(target)


def vocabulary_words(backbone) -> list[str]:
    """The plain words of the backbone's own tokenizer vocabulary in id order (special tokens left out), or []
    when its tokenizer does not expose one (`get_vocab()` of `tokenizers` and transformers, open_clip's
    `encoder`)."""
    tok = getattr(backbone, "_tokenizer", None)
    for obj in (tok, getattr(tok, "tokenizer", None)):
        if obj is None:
            continue
        vocab = None
        if callable(getattr(obj, "get_vocab", None)):
            vocab = obj.get_vocab()
        elif isinstance(getattr(obj, "encoder", None), dict):
            vocab = obj.encoder
        if vocab:
            special = set(getattr(obj, "all_special_tokens", None) or ())
            ordered = sorted(vocab.items(), key=lambda kv: kv[1])
            return [
                w
                for w, _ in ordered
                if isinstance(w, str) and w not in special and not (w.startswith("<") and w.endswith(">")) and w.strip()
            ]
    return []


def _random_texts(backbone, n: int, seed: int) -> list[str]:
    """`n` random strings of 1-11 words of the backbone's own vocabulary (random letters without one)."""
    rng = np.random.default_rng(seed)
    words = vocabulary_words(backbone)
    if not words:
        letters = list("abcdefghijklmnopqrstuvwxyz")
        words = ["".join(rng.choice(letters, size=int(rng.integers(1, 9)))) for _ in range(64)]
    return [" ".join(rng.choice(words, size=int(rng.integers(1, 12)))) for _ in range(n)]


def eval_dataset(spec: str | None, recipe: dict | None, domain: str, n: int, seed: int = 1000, task: str | None = None):
    """The eval set of exportable `task`: `spec` if given, else the recipe's (when it trained that task),
    else `n` examples of the world data kind's `domain` (seed 1000, as the shipped recipes use for eval)."""

    task = task or exportable_tasks()[0]
    world_spec = {"kind": WORLD_KIND, "domain": domain, "task": task, "n": n, "seed": seed}
    source: Any = spec
    if source is None and recipe and recipe.get("task") == task:
        source = recipe.get("data", {}).get("eval")
    parsed = parse_data_spec(source if source is not None else world_spec)
    if parsed.get("kind") == WORLD_KIND:
        parsed["n"] = min(int(parsed.get("n") or n), n)
        parsed.setdefault("task", task)
    try:
        ds = load_data(parsed, task=task)
    except VlkitError:
        if spec is not None or source is None:
            raise
        parsed = dict(world_spec)  # the recipe's eval data is not on this machine: the world's, for the domain
        ds = load_data(parsed, task=task)
    label = spec if isinstance(spec, str) else ", ".join(f"{k}={v}" for k, v in parsed.items() if k != "task")
    if len(ds) > n:
        ds = ds.select(range(n))
    return ds, label


def tokenizer_files(backbone) -> dict[str, bytes]:
    """Files a consumer tokenizes with, without vlkit: the backbone's own, else what its tokenizer saves."""
    files = {k: v.encode() if isinstance(v, str) else bytes(v) for k, v in (backbone.tokenizer_files() or {}).items()}
    if files:
        return files
    tok = getattr(backbone, "_tokenizer", None)
    inner = getattr(tok, "tokenizer", tok)  # open_clip's HFTokenizer wraps a transformers tokenizer
    if inner is not None and hasattr(inner, "save_pretrained"):
        with tempfile.TemporaryDirectory() as d:
            inner.save_pretrained(d)
            for p in Path(d).rglob("*"):
                if p.is_file():
                    files[str(p.relative_to(d))] = p.read_bytes()
        return files
    try:
        from open_clip.tokenizer import SimpleTokenizer, default_bpe
    except ImportError:
        return files
    if isinstance(tok, SimpleTokenizer):
        import json

        bpe = Path(default_bpe())
        files[bpe.name] = bpe.read_bytes()
        files["tokenizer_config.json"] = json.dumps(
            {
                "type": "open_clip.SimpleTokenizer",
                "bpe_file": bpe.name,
                "context_length": backbone.context_length,
                "sot_token_id": tok.sot_token_id,
                "eot_token_id": tok.eot_token_id,
                "lower_case": True,
            },
            indent=1,
        ).encode()
    return files


def _chunks(n: int, size: int = BATCH):
    for i in range(0, n, size):
        yield slice(i, i + size)


def _reference_fn(backbone, merged: list[str]):
    """The PyTorch reference of a graph on a set of inputs (adapters unmerged), computed once per input set:
    the `real` verification inputs and the eval-set score share theirs."""

    cache: dict[tuple, tuple[dict, dict[str, np.ndarray]]] = {}

    @torch.no_grad()
    def reference(graph: GraphSpec, inputs: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
        key = (graph.name, input_key(inputs))
        if key in cache:
            return cache[key][1]
        module = graph.reference or graph.module
        n = len(next(iter(inputs.values())))
        parts: list[list[np.ndarray]] = [[] for _ in graph.outputs]
        with unmerged(backbone, merged):
            for sl in _chunks(n):
                out = module(*[t[sl] for t in inputs.values()])
                out = out if isinstance(out, tuple) else (out,)
                for i, o in enumerate(out):
                    parts[i].append(o.detach().float().cpu().numpy())
        result = {name: np.concatenate(p) for name, p in zip(graph.outputs, parts)}
        cache[key] = (inputs, result)  # the inputs stay alive with their entry (the key holds addresses)
        return result

    return reference


def _evaluation(
    graphs,
    reference,
    data,
    zs_task,
    label: str,
    has_classifier: bool,
    verify_inputs: dict[str, dict[str, dict[str, torch.Tensor]]],
) -> Evaluation:
    """The eval-set score. Its inputs are the arrays of the `real` verification inputs (the eval images; the
    class prompts, which lead the real text inputs), passed whole, so neither PyTorch nor an exporter that
    caches by `input_key` computes them twice; PyTorch's predictions come from the graphs' references
    (adapters unmerged) on those inputs."""
    labels = data["labels"].numpy()
    px = data["pixels"].numpy()
    n_cls = len(zs_task.class_tokens)
    real_text = verify_inputs.get("text_encoder", {}).get("real", {}).get("input_ids")
    if real_text is None or len(real_text) < n_cls or not torch.equal(real_text[:n_cls], zs_task.class_tokens):
        real_text = zs_task.class_tokens
    text_ids = real_text.numpy()
    by_name = {g.name: g for g in graphs}

    def predict(run) -> np.ndarray:
        if not len(px):
            return np.zeros(0, int)
        if has_classifier:
            return run("classifier", {"pixel_values": px})["logits"].argmax(-1)
        text = run("text_encoder", {"input_ids": text_ids})["text_embeds"][:n_cls]
        return (run("image_encoder", {"pixel_values": px})["image_embeds"] @ text.T).argmax(-1)

    def reference_run(graph: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return reference(by_name[graph], {k: torch.from_numpy(v) for k, v in inputs.items()})

    metric = "accuracy" if has_classifier else "zero-shot accuracy"
    graph = "classifier" if has_classifier else "image_encoder+text_encoder"
    return Evaluation(metric, label, graph, predict, None, labels, reference_run=reference_run)


def build_graphs(backbone, task, class_emb, joint: bool) -> list[GraphSpec]:

    s = backbone.image_size
    g = torch.Generator().manual_seed(0)
    px = torch.randn(2, 3, s, s, generator=g)
    ids = backbone.tokenize(["a photo of a small red cube", "two blue balls left of a green cone"])
    batch = {0: "batch"}
    scale = float(backbone.logit_scale)
    graphs = [
        GraphSpec(
            "image_encoder",
            ImageEncoder(backbone),
            {"pixel_values": px},
            ["image_embeds"],
            {"pixel_values": batch, "image_embeds": batch},
            description="pixels -> normalised image embedding",
        ),
        GraphSpec(
            "text_encoder",
            TextEncoder(backbone),
            {"input_ids": ids},
            ["text_embeds"],
            {"input_ids": batch, "text_embeds": batch},
            description="token ids -> normalised text embedding",
        ),
    ]
    if task is not None:
        graphs.append(
            GraphSpec(
                "classifier",
                Classifier(backbone, task, class_emb),
                {"pixel_values": px},
                ["logits"],
                {"pixel_values": batch, "logits": batch},
                reference=Classifier(backbone, task, None),
                scale={"logits": scale if task.head_kind == "text" else 1.0},
                description=f"pixels -> class logits ({task.head_kind} head over {len(task.class_names)} classes)",
            )
        )
    if joint:
        graphs.append(
            GraphSpec(
                "pair_scorer",
                PairScorer(backbone),
                {"pixel_values": px, "input_ids": ids},
                ["scores", "image_embeds", "text_embeds"],
                {
                    "pixel_values": batch,
                    "input_ids": batch,
                    "scores": batch,
                    "image_embeds": batch,
                    "text_embeds": batch,
                },
                scale={"scores": scale},
                description="image i with text i -> joint (fusion) score",
            )
        )
    return graphs


def _verify_inputs(
    backbone, graphs, data, zs_task, captions: list[str] | None, seed: int
) -> dict[str, dict[str, dict[str, torch.Tensor]]]:
    """Fresh random inputs (batch 3, not the traced 2) and real ones: eval images, class prompts and captions;
    the pair scorer gets each eval image with its own caption (else its class prompt)."""
    s = backbone.image_size
    g = torch.Generator().manual_seed(seed)
    rnd_px = torch.randn(3, 3, s, s, generator=g)
    rnd_ids = backbone.tokenize(_random_texts(backbone, 3, seed))
    real_px = data["pixels"]
    k = min(len(real_px), 32)
    if captions:
        cap_ids = backbone.tokenize([str(c) for c in captions[:k]])
        real_ids = torch.cat([zs_task.class_tokens, cap_ids])
    else:
        lab = data["labels"][:k].clamp_min(0) % len(zs_task.class_tokens)
        cap_ids = zs_task.class_tokens[lab]
        real_ids = zs_task.class_tokens
    out: dict[str, dict[str, dict[str, torch.Tensor]]] = {}
    for gr in graphs:
        names = list(gr.inputs)
        if names == ["pixel_values"]:
            out[gr.name] = {"random": {"pixel_values": rnd_px}, "real": {"pixel_values": real_px}}
        elif names == ["input_ids"]:
            out[gr.name] = {"random": {"input_ids": rnd_ids}, "real": {"input_ids": real_ids}}
        else:
            out[gr.name] = {
                "random": {"pixel_values": rnd_px, "input_ids": rnd_ids},
                "real": {"pixel_values": real_px[: len(cap_ids)], "input_ids": cap_ids},
            }
    return out


def _staged_files(staging: Path) -> list[str]:
    """Relative paths of the staged files, given the usual mode (staged temporaries may be private)."""
    umask = os.umask(0)
    os.umask(umask)
    files = []
    for p in sorted(q for q in staging.rglob("*") if q.is_file()):
        os.chmod(p, 0o666 & ~umask)
        files.append(str(p.relative_to(staging)))
    return files


def export_model(
    out: str | Path,
    *,
    backbone: str | None = None,
    adapters: Sequence[str | Path] = (),
    target: str = "onnx",
    task: str | None = None,
    domain: str | None = None,
    eval_data: str | None = None,
    eval_n: int | None = None,
    merge: bool = True,
    options: ExportOptions | None = None,
    overwrite: bool = False,
    unload: bool = False,
) -> dict[str, Any]:
    """Export a backbone with adapters to `out` through exporter `target`, verified; returns the summary.

    `out` follows `vlkit.outputs`: refused when not empty (unless `overwrite`) or one of the adapters, and
    written whole: a failed verification leaves it as it was. `eval_n` (at most this many eval examples)
    defaults to `EVAL_N` for fp32 graphs and `EVAL_N_LOW_PRECISION` when fp16 or int8 graphs are asked for:
    verification in proportion to what can change. The summary's `timings` gives the seconds of each phase."""
    import time

    t_start = time.perf_counter()
    timings: dict[str, float] = {}

    def lap(phase: str, since: float) -> float:
        now = time.perf_counter()
        timings[phase] = timings.get(phase, 0.0) + now - since
        return now

    output = OutputTarget(out, overwrite=overwrite, inputs=list(adapters), what="export directory")
    output.check()

    options = options or ExportOptions()
    if options.seed is None:
        options = dataclasses.replace(options, seed=secrets.randbelow(2**31))
    exporter = get_exporter(target)
    if unload and not merge:
        raise ConfigError("--merge (fold for good) and --no-merge (keep adapters as operators) contradict each other")
    exportable = exportable_tasks()
    if task is not None and task not in exportable:
        raise ConfigError(f"--task {task!r} cannot be exported; tasks: {', '.join(exportable) or 'none registered'}")
    if domain is not None:  # cheap check before loading anything (the world loader checks again)
        known = kind_domains(WORLD_KIND)
        if known is not None and domain not in known:
            raise ConfigError(f"unknown world domain {domain!r}; domains: {', '.join(known)}")
    user_eval_n = eval_n
    if eval_n is None:
        eval_n = EVAL_N_LOW_PRECISION if (options.fp16 or options.quantize) else EVAL_N
    if eval_n < 1:
        raise ConfigError(f"eval_n must be at least 1, got {eval_n}")
    options = dataclasses.replace(options, extra=exporter.target_options(options.extra))  # its options_cls's
    exporter.check(options)
    sources = [read_source(p) for p in adapters]
    spec = backbone or next((s["backbone"] for s in sources if s.get("backbone")), None)
    if not spec:
        raise ConfigError("no backbone: give --backbone (the adapters do not name one)")

    t = time.perf_counter()
    bb = load_backbone(spec)
    if getattr(bb, "kind", None) == "generative":  # vision, encoder and decoder graphs, verified by generating
        given = {
            "--task": task,
            "--domain": domain,
            "--eval-data": eval_data,
            "--eval-n": user_eval_n,
            "--fp16": options.fp16,
            "--quantize": options.quantize,
            "--target": None if target == "onnx" else target,
        }
        return export_generative(
            output, bb, [s["path"] for s in sources], options=options, merge=merge, unload=unload, given=given
        )
    loaded = (
        load_sources(bb, [s["path"] for s in sources])
        if sources
        else {"names": [], "mode": "stack", "weights": None, "adapters": [], "task_dirs": []}
    )
    t = lap("load", t)
    meta, meta_dir = task_source(loaded["task_dirs"])
    recipe = recipe_data(loaded["task_dirs"])
    dom = domain or recipe_domain(recipe, WORLD_KIND) or DEFAULT_DOMAIN
    eval_task = task or ((meta or {}).get("name") if (meta or {}).get("name") in exportable else None)
    eval_task = eval_task or (exportable[0] if exportable else None)
    if eval_task is None:
        raise ConfigError("no registered task is exportable (a task declares `exportable = True`)")
    ds, label = eval_dataset(eval_data, recipe, dom, eval_n, task=eval_task)
    with torch.no_grad():  # the model as vlkit runs it: nothing is merged yet
        zs_task = build_task(bb, eval_task, meta, meta_dir, ds, zero_shot=True)
        the_task = build_task(bb, eval_task, meta, meta_dir, ds) if task is not None else None
        class_emb = the_task.class_embeddings(bb) if the_task is not None and the_task.head_kind == "text" else None
        data = materialize((the_task or zs_task).prepare(bb, ds))
    joint = bb.joint_active()
    graphs = build_graphs(bb, the_task, class_emb, joint)
    merged: list[str] = []  # filled below; later references unmerge these
    reference = _reference_fn(bb, merged)
    captions = list(ds["caption"]) if "caption" in ds.column_names else None
    assert options.seed is not None  # drawn above when not given
    verify_inputs = _verify_inputs(bb, graphs, data, zs_task, captions, options.seed)
    evaluation = _evaluation(graphs, reference, data, zs_task, label, the_task is not None, verify_inputs)
    t = lap("eval data and tasks", t)
    for g in graphs:  # every PyTorch reference, once, before anything is folded into the weights
        for inputs in verify_inputs[g.name].values():
            reference(g, inputs)
    evaluation.reference_predictions  # noqa: B018 - the eval-set score's PyTorch side (cached inputs)
    t = lap("pytorch references", t)
    if unload:  # `--merge`: fold for good (`merge_and_unload`), no copy kept
        unloaded = AdaptedModel.of(bb).merge_and_unload()
    else:
        unloaded = []
        merged.extend(merge_where_possible(bb, enabled=merge))
    for a in loaded["adapters"]:
        a["merged"] = a["name"] in merged or a["name"] in unloaded
    t = lap("merge", t)

    out = Path(out)
    output.__enter__()
    staging = output.staging
    describe = {
        "backbone": bb.describe(),
        "adapters": loaded["adapters"],
        "mode": loaded["mode"],
        "weights": loaded["weights"],
        "merged": merged + unloaded,
        "domain": dom,
    }
    request = ExportRequest(bb, graphs, verify_inputs, reference, evaluation, options, staging, describe)
    try:
        result: ExportResult = exporter.export(request)
        t = lap(f"{target} export and verification", t)
        summary = _summary(request, result, out, target, the_task, zs_task, label)
        if result.failed:
            worst = max(result.failed, key=lambda c: c.max_abs_diff / (c.tolerance or 1.0))
            raise ExportError(
                f"{len(result.failed)} verification check(s) failed: {worst.graph} ({worst.precision}, "
                f"{worst.inputs} inputs) output {worst.output} differs from PyTorch by {worst.max_abs_diff:.3g} "
                f"(tolerance {worst.tolerance:.3g}); nothing was written to {out}",
                summary=summary,
            )
        tok = tokenizer_files(bb)
        for name, blob in tok.items():
            (staging / "tokenizer" / name).parent.mkdir(parents=True, exist_ok=True)
            (staging / "tokenizer" / name).write_bytes(blob)
        summary["manifest"]["tokenizer"] = {
            "dir": "tokenizer",
            "files": sorted(tok),
            "context_length": bb.context_length,
        }
        write_json(staging / "export.json", summary["manifest"])
        summary["written"] = _staged_files(staging)
        lap("write", t)
        timings.update({f"{target}: {k}": v for k, v in result.timings.items()})
        timings["total"] = time.perf_counter() - t_start
        summary["timings"] = timings
    except BaseException as exc:
        output.__exit__(type(exc), exc, exc.__traceback__)  # nothing published: the old directory stays
        raise
    output.__exit__(None, None, None)
    return summary


def _summary(
    request: ExportRequest, result: ExportResult, out: Path, target: str, task, zs_task, eval_label: str
) -> dict[str, Any]:
    bb = request.backbone
    used = task or zs_task
    graphs = []
    for f in result.files:
        spec = request.graph(f["graph"])
        graphs.append({**f, "description": spec.description, **spec.io()})
    worst: dict[str, float] = {}
    for c in result.checks:
        worst[c.precision] = max(worst.get(c.precision, 0.0), c.max_abs_diff)
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "vlkit_version": __version__,
        "target": target,
        **request.describe,
        "logit_scale": float(bb.logit_scale),
        "preprocessing": {
            "image_size": bb.image_size,
            "mean": list(bb.mean),
            "std": list(bb.std),
            "resize": "the backbone's own eval transform (see `transform`)",
            "transform": re.sub(r" at 0x[0-9a-f]+", "", repr(bb.image_transform)),
            "channel_order": "RGB",
            "layout": "NCHW",
            "pixel_scale": "x / 255, then (x - mean) / std",
        },
        "task": None
        if task is None
        else {"name": task.name, "class_names": task.class_names, "prompt": task.prompt, "head": task.head_kind},
        "zero_shot_prompts": used.prompts,
        "graphs": graphs,
        "verification": {
            "passed": not result.failed,
            "max_abs_diff": worst,
            "seed": request.options.seed,
            "checks": [c.to_dict() for c in result.checks],
        },
        "eval": {"dataset": eval_label, "scores": result.scores},
        **result.manifest,
    }
    return {
        "output_dir": str(out),
        "target": target,
        "passed": not result.failed,
        "backbone": bb.spec,
        "adapters": request.describe["adapters"],
        "merged": request.describe["merged"],
        "files": result.files,
        "checks": [c.to_dict() for c in result.checks],
        "scores": result.scores,
        "max_abs_diff": worst,
        "notes": result.notes,
        "manifest": manifest,
    }
