"""`vlkit serve --engine onnx`: the same endpoints over `vlkit export` directories through onnxruntime.

Each `--adapters` item (or hot-loaded directory) is one export directory (`export.json`, `image_encoder.onnx`,
`text_encoder.onnx`, optionally `classifier.onnx` and `pair_scorer.onnx`): the adapter is folded into the weights
or present as operators, as `vlkit export` wrote it. Images go through the backbone's eval transform rebuilt from
the manifest (`preprocessing`), texts through the shipped `tokenizer/tokenizer.json`. A batch is grouped by
adapter, one session run per graph and group (the graphs have a dynamic batch axis). VQA heads are not exported,
so `/v1/answer` and `auto` are refused with a 400.

A generative export (`vision.onnx` and the LM's graphs, `vlkit.export.generative`) answers `/v1/generate` only,
through `vlkit.serve.onnx_generative`: requests grouped by export and decoding settings, greedy or beam search,
the same text as the PyTorch server. One server serves exports of one backbone, so of one kind.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..backbones.base import shortest_edge_transform
from ..backbones.state import check_adapter_name
from ..compose.resolve import free_name
from ..errors import AdapterFileError, ConfigError, RequestError
from .engine import DEFAULT_PROMPT
from .generate_api import OP as GENERATE
from .generate_api import PATH as GENERATE_PATH
from .guards import RESERVED_NAMES, check_served_name, prompt_problem
from .inputs import AUTO
from .onnx_generative import PromptCodec, check_graphs, generate_texts, is_generative_export

MANIFEST = "export.json"


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


@dataclass
class OnnxEntry:
    name: str
    source: str
    manifest: dict
    sessions: dict = field(default_factory=dict)

    @property
    def task(self) -> dict | None:
        return self.manifest.get("task")

    def describe(self) -> dict[str, Any]:
        t = self.task or {}
        return {
            "name": self.name,
            "kind": "export",
            "source": self.source,
            "task": t.get("name") if isinstance(t, dict) else None,
            "labels": t.get("class_names") if isinstance(t, dict) else None,
            "graphs": sorted(self.sessions),
            "adapters": [a.get("name") for a in self.manifest.get("adapters", [])],
            "joint": "pair_scorer" in self.sessions,
            "generative": is_generative_export(self.manifest),
        }


class OnnxCatalog:
    def __init__(self, providers=None, threads: int | None = None):
        self.providers = providers or ["CPUExecutionProvider"]
        self.threads = threads
        self.entries: dict[str, OnnxEntry] = {}
        self.fingerprint: str | None = None
        self.transform: Any = None  # set from the first export's manifest (preprocessing, tokenizer)
        self.tokenizer: Any = None
        self.codec: PromptCodec | None = None  # generative exports: their prompts in, text out
        self.generative = False
        self.logit_scale = 1.0
        self.spec = "onnx"

    def get(self, name: str) -> OnnxEntry:
        if name not in self.entries:
            raise RequestError(
                f"unknown adapter {name!r}; loaded: {', '.join(sorted(self.entries)) or 'none'}", status=404
            )
        return self.entries[name]

    def add(self, text: str, name: str | None = None) -> str:
        import onnxruntime as ort

        given, sep, rest = text.partition("=")
        path = Path(rest if sep and "/" not in given else text).expanduser()
        name = name or (given if sep and "/" not in given else None)
        mfile = path / MANIFEST
        if not mfile.is_file():
            raise AdapterFileError(f"{path} is not a vlkit export directory (no {MANIFEST})")
        try:
            manifest = json.loads(mfile.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise AdapterFileError(f"{mfile} is not valid JSON: {exc}") from None
        fp = (manifest.get("backbone") or {}).get("fingerprint")
        if self.fingerprint is not None and fp != self.fingerprint:
            raise AdapterFileError(
                f"{path} was exported from another backbone (fingerprint {fp}, serving {self.fingerprint})"
            )
        if name is None:
            adapters = [a.get("name") for a in manifest.get("adapters", []) if a.get("name")]
            name = free_name(set(self.entries) | set(RESERVED_NAMES), "+".join(adapters) or path.name)
        check_served_name(check_adapter_name(name))
        if name in self.entries:
            raise RequestError(f"an adapter named {name!r} is already loaded; unload it first", status=409)
        sessions = {}
        for g in manifest.get("graphs", []):
            if g.get("precision", "fp32") != "fp32" or g.get("graph") in sessions:
                continue
            f = path / g["file"]
            try:
                opts = ort.SessionOptions()
                if self.threads:
                    opts.intra_op_num_threads = int(self.threads)
                    opts.inter_op_num_threads = 1
                sessions[g["graph"]] = ort.InferenceSession(str(f), sess_options=opts, providers=self.providers)
            except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own types
                reason = " ".join(str(exc).split())[:200]
                raise AdapterFileError(f"{f} cannot be loaded by onnxruntime: {reason}") from None
        if is_generative_export(manifest):
            check_graphs(path, manifest, sessions)
        elif "image_encoder" not in sessions or "text_encoder" not in sessions:
            raise AdapterFileError(f"{path} lacks image_encoder / text_encoder graphs")
        if self.entries and is_generative_export(manifest) != self.generative:
            raise AdapterFileError(f"{path} is another kind of export than those served (generative and contrastive)")
        if self.fingerprint is None:
            self._setup(path, manifest)
        self.entries[name] = OnnxEntry(name, str(path), manifest, sessions)
        return name

    def _setup(self, path: Path, manifest: dict) -> None:
        pre = manifest.get("preprocessing") or {}
        m = re.search(r"interpolation=(\w+)", pre.get("transform", ""))
        interp = m.group(1).lower() if m else "bicubic"
        self.transform = shortest_edge_transform(int(pre["image_size"]), pre["mean"], pre["std"], interp)
        if is_generative_export(manifest):
            self.codec, self.generative = PromptCodec(path, manifest), True
        else:
            tok = path / "tokenizer" / "tokenizer.json"
            if not tok.is_file():
                raise ConfigError(
                    f"{path} has no tokenizer/tokenizer.json; the onnx engine tokenizes with `tokenizers`"
                )
            from tokenizers import Tokenizer

            self.tokenizer = Tokenizer.from_file(str(tok))
            self.logit_scale = float(manifest.get("logit_scale", 1.0))
        self.fingerprint = (manifest.get("backbone") or {}).get("fingerprint")
        self.spec = (manifest.get("backbone") or {}).get("spec") or "onnx"

    def remove(self, name: str) -> None:
        self.get(name)
        del self.entries[name]


class OnnxRunner:
    def __init__(self, catalog: OnnxCatalog):
        self.catalog = catalog

    def run(self, items) -> list[Any]:
        groups: dict[str, list] = {}
        generations: dict[tuple, list[int]] = {}
        out: dict[int, Any] = {}
        for i, it in enumerate(items):
            if it.adapter is None or it.adapter == AUTO or it.adapter not in self.catalog.entries:
                out[i] = RequestError(
                    "the onnx engine serves exported adapters by name (no frozen backbone, no 'auto')"
                    if it.adapter in (None, AUTO)
                    else f"unknown adapter {it.adapter!r}",
                    status=400 if it.adapter in (None, AUTO) else 404,
                )
            elif (it.op == GENERATE) != self.catalog.generative:
                out[i] = RequestError(self.kind_problem(it.op))
            elif it.op == GENERATE:
                generations.setdefault((it.adapter, it.max_new_tokens, it.num_beams), []).append(i)
            else:
                groups.setdefault(it.adapter, []).append(i)
        for (name, _, _), idxs in generations.items():
            self._generate(self.catalog.entries[name], [items[i] for i in idxs], idxs, out)
        for name, idxs in groups.items():
            entry = self.catalog.entries[name]
            group = [items[i] for i in idxs]
            img_rows = [it for it in group if it.pixels is not None]
            txt_rows = [it for it in group if it.tokens is not None]
            if img_rows:
                px = np.stack([np.asarray(it.pixels, dtype=np.float32) for it in img_rows])
                emb = entry.sessions["image_encoder"].run(None, {"pixel_values": px})[0]
                for j, it in enumerate(img_rows):
                    it.feats["image"] = emb[j : j + 1]
                if "classifier" in entry.sessions and any(it.op == "classify" and it.labels is None for it in img_rows):
                    logits = entry.sessions["classifier"].run(None, {"pixel_values": px})[0]
                    for j, it in enumerate(img_rows):
                        it.feats["logits"] = logits[j]
            if txt_rows:
                ids = np.concatenate([np.asarray(it.tokens, dtype=np.int64) for it in txt_rows])
                emb = entry.sessions["text_encoder"].run(None, {"input_ids": ids})[0]
                s = 0
                for it in txt_rows:
                    it.feats["text"] = emb[s : s + len(it.tokens)]
                    s += len(it.tokens)
            for i, it in zip(idxs, group):
                try:
                    out[i] = self.answer(entry, it)
                except RequestError as exc:
                    out[i] = exc
        return [out[i] for i in range(len(items))]

    def kind_problem(self, op: str) -> str:
        """Why operation `op` is refused by this server's kind of export."""
        if self.catalog.generative:
            return f"{self.catalog.spec} is a generative export: it answers {GENERATE_PATH} only, not /v1/{op}"
        return (
            f"{GENERATE_PATH} needs a generative export (vlkit export of a vl: backbone such as tiny-vl); "
            f"{self.catalog.spec} embeds and scores"
        )

    def _generate(self, entry: OnnxEntry, group: list, idxs: list[int], out: dict[int, Any]) -> None:
        assert self.catalog.codec is not None  # set with the first generative export
        try:
            texts: list[Any] = generate_texts(entry, self.catalog.codec, group)
        except RequestError as exc:
            texts = [exc] * len(group)
        for i, text in zip(idxs, texts):
            out[i] = text if isinstance(text, BaseException) else {"text": text, "adapter": entry.name}

    def answer(self, entry: OnnxEntry, it) -> dict[str, Any]:
        f, scale = it.feats, self.catalog.logit_scale
        if it.op == "embed":
            return {
                "embedding": (f["image"] if it.pixels is not None else f["text"])[0].astype(float).tolist(),
                "adapter": entry.name,
            }
        if it.op == "score":
            if "pair_scorer" in entry.sessions:
                n = len(it.tokens)
                px = np.repeat(np.asarray(it.pixels, dtype=np.float32)[None], n, axis=0)
                s = entry.sessions["pair_scorer"].run(
                    None, {"pixel_values": px, "input_ids": np.asarray(it.tokens, dtype=np.int64)}
                )[0]
                return {"scores": [round(float(v), 4) for v in s], "adapter": entry.name, "joint": True}
            s = scale * (f["text"] @ f["image"][0])
            return {"scores": [round(float(v), 4) for v in s], "adapter": entry.name, "joint": False}
        if it.op == "classify":
            if it.labels is not None:
                names, probs = it.labels, _softmax(scale * (f["image"][0] @ f["text"].T))
            elif "logits" in f:
                names, probs = (entry.task or {})["class_names"], _softmax(f["logits"].astype(np.float64))
            else:
                raise RequestError(
                    f"export {entry.name!r} has no classifier graph (vlkit export --task ...); give `labels`"
                )
            order = np.argsort(-probs, kind="stable")
            top = [{"class": names[j], "p": round(float(probs[j]), 4)} for j in order]
            return {
                "scores": {t["class"]: t["p"] for t in top},
                "top": top[: it.top],
                "adapter": entry.name,
                "task": (entry.task or {}).get("name") if it.labels is None else None,
            }
        raise RequestError("the onnx engine cannot answer questions: vlkit export writes no VQA head")


class OnnxBackend:
    name = "onnx"

    def __init__(self, exports, providers=None, threads: int | None = None):
        self.catalog = OnnxCatalog(providers, threads)
        items = [p.strip() for p in exports.split(",") if p.strip()] if isinstance(exports, str) else list(exports)
        if not items:
            raise ConfigError("--engine onnx needs --adapters EXPORT_DIR[,...] (directories written by vlkit export)")
        for item in items:
            self.catalog.add(str(item))
        self.runner = OnnxRunner(self.catalog)

    @property
    def spec(self) -> str:
        return self.catalog.spec

    def preprocess(self, image):
        return self.catalog.transform(image).numpy()

    def tokenize(self, texts: list[str]):
        enc = self.catalog.tokenizer.encode_batch([str(t) for t in texts])
        return np.asarray([e.ids for e in enc], dtype=np.int64)

    @property
    def generative(self) -> bool:
        """Whether the exports served are generative ones (they answer /v1/generate only)."""
        return self.catalog.generative

    def check_adapter(self, adapter, op: str) -> None:
        if (op == GENERATE) != self.catalog.generative:
            raise RequestError(self.runner.kind_problem(op))
        if adapter is None or adapter == AUTO:
            raise RequestError(
                "the onnx engine serves exported adapters by name: give `adapter` (no frozen backbone, no 'auto')"
            )
        self.catalog.get(adapter)
        if op == "answer":
            raise RequestError("the onnx engine cannot answer questions: vlkit export writes no VQA head")

    def prompt_for(self, adapter) -> str:
        entry = self.catalog.entries.get(adapter)
        prompt = (entry.task or {}).get("prompt") if entry is not None else None
        return prompt if isinstance(prompt, str) and prompt_problem(prompt) is None else DEFAULT_PROMPT

    def describe(self) -> dict[str, Any]:
        return {
            "backbone": self.spec,
            "engine": "onnx",
            "adapters": [e.describe() for e in self.catalog.entries.values()],
            "router": None,
        }

    def count(self) -> int:
        return len(self.catalog.entries)

    def load(self, name: str, path: str) -> dict[str, Any]:
        return self.catalog.entries[self.catalog.add(path, name=name)].describe()

    def unload(self, name: str) -> None:
        self.catalog.remove(name)
