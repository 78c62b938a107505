"""Automatic routing: a small router that picks, per input, the adapter to run — no task label needed.

Features are the frozen backbone's normalised embeddings: [image, text, has_image, has_text] (a
missing modality is zeros), so one router serves images, texts and image-text pairs. A two-layer MLP
maps them to one of the composition's adapters (or to "none", the frozen backbone, when trained with
data for it).

Training data: each adapter's own training data (its `recipe.yaml` `data.train` spec, loaded with
`vlkit.data.load_data`) or datasets given per adapter. Every example gives an image-only, a text-only
and an image+text input when it has text — the text its task declares (`Task.input_texts`: the
question for vqa, the expression for grounding, the class prompt of the label for classification, e.g.
"a radiograph showing a nodule"); a seeded 20%
of the examples is held out for the reported routing accuracy.

At inference `route(backbone, pixels, tokens)` predicts indices and `RoutedBackbone` is a view of the
backbone whose encoders route each batch per sample (one forward through `AdaptedModel.route`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from ..adapters.files import read_tensor_file
from ..adapters.model import AdaptedModel
from ..data import load_data
from ..data.api import parse_data_spec
from ..errors import ConfigError, DataError
from ..io import atomic_path
from ..plugins import registry
from ..tasks.base import prepare_pixels, tokenize_texts
from .composition import read_composition

ROUTER_FILE = "router.safetensors"
TEXT_COLUMNS = ("question", "expression", "caption", "text")


class Router(nn.Module):
    """MLP from frozen features (2·D + 2) to one of `names` (None: the frozen backbone)."""

    def __init__(self, dim: int, names: list[str | None], hidden: int = 64):
        super().__init__()
        self.dim, self.hidden = int(dim), int(hidden)
        self.names = list(names)
        self.net = nn.Sequential(nn.Linear(2 * dim + 2, hidden), nn.GELU(), nn.Linear(hidden, len(names)))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(features)

    @torch.no_grad()
    def view(self, backbone) -> RoutedBackbone:
        """`backbone` seen through this router: each encoder input goes through the adapter picked for it."""
        return RoutedBackbone(backbone, self)

    def predict(self, features: torch.Tensor) -> torch.Tensor:
        first = next(iter(self.net.parameters()))
        return self.net(features.to(first)).argmax(-1)


@torch.no_grad()
def features(
    backbone, pixels: torch.Tensor | None = None, tokens: torch.Tensor | None = None, batch_size: int = 256
) -> torch.Tensor:
    """Router inputs (n, 2·D + 2) from the frozen backbone: [image, text, has_image, has_text]."""
    given = pixels if pixels is not None else tokens
    if given is None:
        raise ConfigError("routing needs an image, a text or both")
    n = len(given)
    d = backbone.embed_dim
    dev = next(backbone.parameters()).device
    img = torch.zeros(n, d, device=dev)
    txt = torch.zeros(n, d, device=dev)
    with AdaptedModel.of(backbone).disabled():
        if pixels is not None:
            img = torch.cat(
                [
                    backbone.encode_image(pixels[i : i + batch_size].to(dev), normalize=True)
                    for i in range(0, n, batch_size)
                ]
            ).float()
        if tokens is not None:
            txt = torch.cat(
                [
                    backbone.encode_text(tokens[i : i + batch_size].to(dev), normalize=True)
                    for i in range(0, n, batch_size)
                ]
            ).float()
    flags = torch.tensor([float(pixels is not None), float(tokens is not None)], device=dev).expand(n, 2)
    return torch.cat([img, txt, flags], dim=1)


def route(backbone, router: Router | Any, pixels=None, tokens=None) -> torch.Tensor:
    """Index into `router.names` for each input."""
    return router.predict(features(backbone, pixels, tokens)).cpu()


class RoutedBackbone:
    """A view of a backbone: every encoder call routes each input through the adapter the router picks
    (per sample, one forward pass, via `AdaptedModel.route`). Other attributes are the backbone's."""

    def __init__(self, backbone, router: Router | Any):  # a Router, or any router-like (names, predict): a gate
        object.__setattr__(self, "_backbone", backbone)
        object.__setattr__(self, "router", router)
        object.__setattr__(self, "last_route", None)

    def __getattr__(self, name):
        return getattr(object.__getattribute__(self, "_backbone"), name)

    def _routed(self, call, pixels=None, tokens=None):
        """`call(pixels, tokens)` with each sample through the adapter the router picks: one forward pass where
        the adapters allow per-sample routing, else one per group of samples sharing an adapter."""
        bb = self._backbone
        idx = route(bb, self.router, pixels, tokens)
        object.__setattr__(self, "last_route", idx)
        model = AdaptedModel.of(bb)
        names = self.router.names
        if not model.routes_per_sample(names):
            return _grouped(model, names, idx, call, pixels, tokens)
        model.route(names, idx)
        try:
            return call(pixels, tokens)
        finally:
            model.clear_route()

    def encode_image(self, pixels, normalize: bool = False):
        return self._routed(lambda p, _: self._backbone.encode_image(p, normalize=normalize), pixels=pixels)

    def encode_text(self, tokens, normalize: bool = False):
        return self._routed(lambda _, t: self._backbone.encode_text(t, normalize=normalize), tokens=tokens)

    def encode_image_tokens(self, pixels):
        return self._routed(lambda p, _: self._backbone.encode_image_tokens(p), pixels=pixels)

    def encode_pair(self, pixels, tokens, normalize: bool = True):
        return self._routed(lambda p, t: self._backbone.encode_pair(p, t, normalize=normalize), pixels, tokens)

    def __call__(self, pixels, tokens):
        img, txt = self.encode_pair(pixels, tokens)
        return img, txt, self._backbone.logit_scale


def _take(x, sel: torch.Tensor):
    if x is None:
        return None
    if isinstance(x, torch.Tensor):
        return x[sel.to(x.device)]
    if isinstance(x, dict):
        return type(x)({k: _take(v, sel) for k, v in x.items()})
    return [x[i] for i in sel.tolist()]


def _grouped(model: AdaptedModel, names, idx: torch.Tensor, call, pixels, tokens):
    """`call` once per group of samples routed to the same adapter (None or index -1: the frozen backbone), the
    outputs (a tensor or a tuple of tensors) put back in the samples' order."""
    out: Any = None
    for g in idx.unique().tolist():
        sel = (idx == g).nonzero().flatten()
        name = names[g] if g >= 0 else None
        with model.activated(name) if name is not None else model.disabled():
            part = call(_take(pixels, sel), _take(tokens, sel))
        parts = part if isinstance(part, tuple) else (part,)
        if out is None:
            out = [p.new_empty((len(idx), *p.shape[1:])) for p in parts]
        for o, p in zip(out, parts, strict=True):
            o[sel.to(o.device)] = p
    return tuple(out) if isinstance(part, tuple) else out[0]


# --- training data ---------------------------------------------------------------------------------
def adapter_data_spec(adapter_dir: Path) -> dict[str, Any]:
    """The `data.train` spec (with its task) the adapter was trained on, from its recipe.yaml."""
    from omegaconf import OmegaConf

    recipe = adapter_dir / "recipe.yaml"
    if not recipe.is_file():
        raise ConfigError(
            f"adapter {adapter_dir} has no recipe.yaml naming its training data; give data for it with --data NAME=SPEC"
        )
    cfg = cast(dict, OmegaConf.to_container(OmegaConf.load(recipe), resolve=True))
    spec = dict((cfg.get("data") or {}).get("train") or {})
    if not spec:
        raise ConfigError(f"{recipe} has no data.train")
    spec.setdefault("task", (cfg.get("task") or {}).get("name"))
    return spec


def _load(spec, n: int, seed: int):

    spec = dict(spec) if isinstance(spec, dict) else parse_data_spec(spec)
    spec.pop("shots", None)
    if "mix" in spec:  # a mix: its first source stands for the adapter's inputs
        spec = dict(spec["mix"][0], task=spec.get("task"))
    spec = parse_data_spec(spec)
    if spec.get("kind") == "world":
        spec["n"] = min(int(spec.get("n", n)), n)
    ds = load_data(spec)
    if len(ds) > n:
        ds = ds.shuffle(seed=seed).select(range(n))
    return ds


def example_texts(ds, task_meta: dict | None, task: str | None = None) -> list[str | None]:
    """The text each example's task encodes (the task's declared `input_texts`: its `text_column`, or e.g. the
    class prompt of the label for classification); else the first text column."""

    task = (task_meta or {}).get("name") or task
    opts = (task_meta or {}).get("options") or {}
    if task and task in registry("task"):
        texts = registry("task").get(task).input_texts(ds, opts)
        if texts is not None:
            return texts
    for col in TEXT_COLUMNS:
        if col in ds.column_names:
            return [None if t is None else str(t) for t in ds[col]]
    return [None] * len(ds)


def router_dataset(
    backbone, sources: list[tuple[int, Any, dict | None]], n_per_source: int = 256, seed: int = 0, holdout: float = 0.2
):
    """Features, labels and a held-out mask from (route index target, data spec or Dataset, task meta)."""

    feats, labels, held, kinds = [], [], [], []
    g = torch.Generator().manual_seed(seed)
    for label, data, meta in sources:
        task = data.get("task") if isinstance(data, dict) else None
        ds = data if hasattr(data, "column_names") else _load(data, n_per_source, seed)
        if len(ds) > n_per_source:
            ds = ds.shuffle(seed=seed).select(range(n_per_source))
        if "image" not in ds.column_names:
            raise DataError(f"routing data for {label!r} has no image column ({ds.column_names})")
        pixels = prepare_pixels(backbone, ds).materialize()
        texts = example_texts(ds, meta, task)
        n = len(ds)
        is_held = torch.rand(n, generator=g) < holdout
        variants: list[tuple[str, Any, Any, torch.Tensor]] = [("image", pixels, None, torch.arange(n))]
        with_text = torch.tensor([t is not None for t in texts])
        if bool(with_text.any()):
            idx = torch.nonzero(with_text).flatten()
            tokens = tokenize_texts(backbone, [texts[i] for i in idx.tolist()])
            variants += [("text", None, tokens, idx), ("image+text", pixels[idx], tokens, idx)]
        for kind, px, tok, idx in variants:
            feats.append(features(backbone, px, tok).cpu())
            labels.append(torch.full((len(idx),), label, dtype=torch.long))
            held.append(is_held[idx])
            kinds += [kind] * len(idx)
    return torch.cat(feats), torch.cat(labels), torch.cat(held), kinds


def train_router(
    backbone,
    names: list[str | None],
    sources,
    *,
    hidden: int = 64,
    steps: int = 300,
    lr: float = 3e-3,
    n_per_source: int = 256,
    seed: int = 0,
) -> tuple[Router, dict[str, Any]]:
    """Train a router over `names` from `sources` [(index into names, data, task meta)]; returns it and
    its report: held-out routing accuracy overall, per adapter and per input kind, and chance."""
    x, y, held, kinds = router_dataset(backbone, sources, n_per_source, seed)
    train = ~held
    if not bool(train.any()) or not bool(held.any()):
        raise DataError("too few routing examples for a train/held-out split")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        router = Router(backbone.embed_dim, names, hidden)
    opt = torch.optim.AdamW(router.parameters(), lr=lr, weight_decay=1e-4)
    xt, yt = x[train], y[train]
    for _ in range(steps):
        loss = F.cross_entropy(router(xt), yt)
        opt.zero_grad()
        loss.backward()
        opt.step()
    router.eval()
    pred = router.predict(x[held])
    ok = (pred == y[held]).float()
    held_kinds = [k for k, h in zip(kinds, held.tolist()) if h]
    per_adapter: dict[str, float] = {}
    per_input: dict[str, float] = {}
    report = {
        "heldout_accuracy": 100.0 * float(ok.mean()),
        "chance": 100.0 / len(names),
        "train_examples": int(train.sum()),
        "heldout_examples": int(held.sum()),
        "per_adapter": per_adapter,
        "per_input": per_input,
    }
    for i, n in enumerate(names):
        m = y[held] == i
        if bool(m.any()):
            per_adapter[str(n)] = 100.0 * float(ok[m].mean())
    for kind in dict.fromkeys(held_kinds):
        m = torch.tensor([k == kind for k in held_kinds])
        per_input[kind] = 100.0 * float(ok[m].mean())
    return router, report


def save_routing(
    module: Any, out: Path, file: str, report: dict | None, kind: str | None = None, **fields: Any
) -> dict[str, Any]:
    """Write a router's (or gate's) tensors to `out`/`file` (safetensors, atomically); returns its `router` entry of
    composition.json: its kind (a gate's), file, names and dim, `fields`, features and `report`."""
    from safetensors.torch import save_file

    with atomic_path(Path(out) / file) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}, str(tmp))
    return {
        **({"kind": kind} if kind else {}),
        "file": file,
        "names": module.names,
        "dim": module.dim,
        **fields,
        "features": "frozen normalised [image, text, has_image, has_text]",
        **({"report": report} if report else {}),
    }


def routed_names(path: Path, entry: dict[str, Any], loaded_names: list[str], what: str) -> list[str | None]:
    """The names a composition's `what` (router, gate) routes to, mapped from the composition's adapter names to
    theirs as loaded on the backbone (None: the frozen model)."""
    spec = read_composition(path)
    mapping = dict(zip([a.get("name") for a in spec["adapters"]], loaded_names))
    names: list[str | None] = []
    for n in entry["names"]:
        if n is not None and n not in mapping:
            raise ConfigError(f"{what} of {path} routes to {n!r}, which is not one of its adapters")
        names.append(mapping.get(n) if n is not None else None)
    return names


def save_router(router: Router, out: Path, report: dict | None = None) -> dict[str, Any]:
    """Write router.safetensors; returns the `router` entry of composition.json."""
    return save_routing(router, out, ROUTER_FILE, report, hidden=router.hidden)


def load_router(path: Path, entry: dict[str, Any], loaded_names: list[str]) -> Router:
    """The router of a composition, its names mapped to the adapters' names as loaded on the backbone."""
    names = routed_names(path, entry, loaded_names, "router")
    router = Router(int(entry["dim"]), names, int(entry.get("hidden", 64)))
    router.load_state_dict(read_tensor_file(path / entry.get("file", ROUTER_FILE)))
    return router.eval()


def report_json(report: dict) -> str:
    return json.dumps(report, indent=2)
