"""The PyTorch side of an export: backbone and adapters as vlkit runs them, and the graphs to write.

`load_sources` loads adapter directories (and `vlkit compose` compositions) onto a backbone and activates
them; `merge_where_possible` folds adapters whose variant can merge (LoRA, (IA)^3) into the base weights
so the graph holds plain projections, keeping every other adapter (bottleneck, fusion, plugin variants)
as operators; `unmerged` restores the exact vlkit model for the PyTorch references. The graph modules
(`ImageEncoder`, `TextEncoder`, `Classifier`, `PairScorer`) take and return plain tensors with the
input and output names of the exported graphs.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..adapters.base import AdapterVariant
from ..adapters.files import read_adapter_config, read_tensor_file
from ..adapters.model import AdaptedModel
from ..compose.resolve import AdapterResolver
from ..errors import AdapterFileError, ConfigError, InjectionError
from ..plugins import registry

COMPOSITION_FILE = "composition.json"


# --- adapters ---------------------------------------------------------------------------------
def read_source(path: str | Path) -> dict[str, Any]:
    """Check an adapter or composition directory without loading tensors; returns its description."""

    path = Path(path)
    comp = path / COMPOSITION_FILE
    if path.is_dir() and comp.is_file():
        try:
            data = json.loads(comp.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise AdapterFileError(f"{comp} is not valid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise AdapterFileError(f"{comp} is not a vlkit composition (expected a JSON object)")
        return {"kind": "composition", "path": str(path), "backbone": data.get("backbone"), "config": data}
    cfg = read_adapter_config(path)
    return {"kind": "adapter", "path": str(path), "backbone": cfg.get("backbone"), "config": cfg}


def load_sources(backbone, paths: Sequence[str | Path]) -> dict[str, Any]:
    """Load every adapter / composition directory onto `backbone` (through the one resolver,
    `vlkit.compose.resolve`) and activate them.

    Several directories are stacked in order; a composition (exported alone) keeps its own mode, weights
    and fusion layers; a merged composition is one plain adapter. Returns {"names", "mode", "weights",
    "adapters": [description per adapter], "task_dirs": directories that may hold task metadata}.
    """

    resolver = AdapterResolver(backbone)
    names: list[str] = []
    described: list[dict[str, Any]] = []
    task_dirs: list[Path] = []
    system = None
    for p in paths:
        p = Path(p)
        info = read_source(p)
        if info["kind"] == "composition":
            if len(paths) > 1:
                raise ConfigError(f"{p} is a composition; export it alone (without other --adapter directories)")
            system = resolver.resolve(str(p))
            if system.mode == "route":
                raise ConfigError(
                    f"{p} routes each input to one adapter; a graph holds one model",
                    hint=f"export each adapter alone: --adapter {p}/adapters/<name> ({', '.join(system.names)})",
                )
            got = list(system.names)
            task_dirs.append(p)
            task_dirs.extend(Path(t["dir"]) for t in system.composition.tasks.values() if t.get("dir") is not None)
        else:
            got = [resolver.part(str(p))[0]]
            task_dirs.append(p)
        for n in got:
            names.append(n)
            rec = AdaptedModel.of(backbone).records[n]
            described.append(
                {"name": n, "variant": rec.variant, "path": str(p), "sites": len(rec.sites), "source": info["kind"]}
            )
    if system is not None:
        system.activate(backbone)
        mode, weights = system.composition.mode, system.composition.weights
    else:
        AdaptedModel.of(backbone).set_adapter(*names)
        mode, weights = "stack", None
    return {
        "names": names,
        "mode": mode,
        "weights": weights,
        "adapters": described,
        "task_dirs": [str(d) for d in dict.fromkeys(task_dirs)],
    }


def _mergeable(variant) -> bool:
    return type(variant).merged_weight is not AdapterVariant.merged_weight


def merge_where_possible(backbone, enabled: bool = True) -> list[str]:
    """Fold active adapters into the base weights where that is exact; returns the merged names.

    Only in plain stacking (no weights, no routing), only variants that merge, and only when no earlier
    adapter left as an operator acts at the same site (stacking order there must be kept).
    """
    model = AdaptedModel.of(backbone)
    st = model.state
    if (
        not enabled
        or st.route is not None
        or st.mode != "stack"
        or st.fusion
        or any(w != 1.0 for w in st.weights.values())
    ):
        return []
    merged: list[str] = []
    blocked: set[str] = set()
    for name in st.active:
        rec = model.records[name]
        var = registry("adapter").get(rec.variant)
        paths = {s.path for s in rec.sites}
        ok = (
            _mergeable(var)
            and not var.joint
            and not rec.extra
            and all(s.kind == "linear" for s in rec.sites)
            and not (paths & blocked)
        )
        if ok:
            try:
                model.merge_adapter(name)
            except InjectionError:
                model.unmerge_adapter(name)
                ok = False
        if ok:
            merged.append(name)
        else:
            blocked |= paths
    return merged


@contextmanager
def unmerged(backbone, merged: list[str]):
    """The model exactly as vlkit runs it (merged adapters unfolded) inside the block."""
    model = AdaptedModel.of(backbone)
    for name in reversed(merged):
        model.unmerge_adapter(name)
    try:
        yield
    finally:
        for name in merged:
            model.merge_adapter(name)


# --- task -------------------------------------------------------------------------------------
def task_source(paths: list[str | Path]) -> tuple[dict[str, Any] | None, Path | None]:
    """The task metadata of the first source that records one (task.json, else the adapter config)."""
    for p in paths:
        p = Path(p)
        meta = None
        if (p / "task.json").is_file():
            try:
                meta = json.loads((p / "task.json").read_text())
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise AdapterFileError(f"{p / 'task.json'} is not valid JSON: {exc}") from None
        elif (p / "adapter_config.json").is_file():
            meta = json.loads((p / "adapter_config.json").read_text()).get("task") or None
        if isinstance(meta, dict) and meta.get("name"):
            return meta, p
    return None, None


def recipe_data(paths: list[str | Path]) -> dict[str, Any] | None:
    """The `task` and `data` sections of the recipe a trained adapter directory was made with, if any."""
    for p in paths:
        f = Path(p) / "recipe.yaml"
        if f.is_file():
            from omegaconf import OmegaConf

            try:
                cfg = OmegaConf.to_container(OmegaConf.load(f), resolve=False)
            except Exception:  # a recipe we cannot read only costs us a default
                continue
            if isinstance(cfg, dict):
                return {"task": (cfg.get("task") or {}).get("name"), "data": cfg.get("data") or {}}
    return None


def recipe_domain(recipe: dict[str, Any] | None, kind: str = "world") -> str | None:
    """The domain of the recipe's data of dataset kind `kind` (its eval data, else its train data), or None."""
    for key in ("eval", "train"):
        spec = (recipe or {}).get("data", {}).get(key)
        if isinstance(spec, dict) and spec.get("kind") == kind and isinstance(spec.get("domain"), str):
            return spec["domain"]
    return None


def exportable_tasks() -> list[str]:
    """Registered tasks that declare `exportable` (see `vlkit.tasks.base.Task`), in registration order."""

    return [e.name for e in registry("task") if e.obj.exportable]


def build_task(
    backbone, name: str, meta: dict[str, Any] | None, meta_dir: Path | None, data=None, zero_shot: bool = False
):
    """Exportable task `name` as an adapter was trained with it (head loaded; class names and prompt from its
    saved task), or, without saved class names, one whose class names and prompt come from `data` (the eval
    set: its ClassLabel names, the prompt its dataset kind declares for its domain). `zero_shot` applies the
    task's `zero_shot_options` (classification: the text head)."""

    cls = registry("task").get(name)
    options: dict[str, Any] = {}
    if meta and meta.get("name") == name:
        options = {k: v for k, v in (meta.get("options") or {}).items() if k in cls.OPTIONS and v is not None}
    if not options.get("class_names"):
        options = {}  # nothing saved to build on: a zero-shot task over the eval set's classes
    if zero_shot:
        options.update(cls.zero_shot_options)
    task = cls(backbone, None if options.get("class_names") else data, **options)
    if task.head_kind != "text":
        head_file = meta_dir / "head.safetensors" if meta_dir is not None else None
        if head_file is None or not head_file.is_file():
            raise AdapterFileError(
                f"the {name} task of {meta_dir} has a {task.head_kind} head but no head.safetensors beside it"
            )

        task.load_head_state(read_tensor_file(head_file))
    task.head.eval()
    for p in task.head.parameters():
        p.requires_grad_(False)
    return task


# --- graph modules ----------------------------------------------------------------------------
class ImageEncoder(nn.Module):
    """pixel_values (B, 3, S, S) -> image_embeds (B, D), L2-normalised."""

    def __init__(self, backbone):
        super().__init__()
        self.backbone = backbone

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.backbone.encode_image(pixel_values, normalize=True)


class TextEncoder(nn.Module):
    """input_ids (B, context) -> text_embeds (B, D), L2-normalised."""

    def __init__(self, backbone):
        super().__init__()
        self.backbone = backbone

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.backbone.encode_text(input_ids, normalize=True)


class Classifier(nn.Module):
    """pixel_values -> logits (B, C) through the task's head; `class_emb` given: baked in (text head)."""

    _task: Any
    class_emb: torch.Tensor | None

    def __init__(self, backbone, task, class_emb: torch.Tensor | None):
        super().__init__()
        self.backbone = backbone
        self.head = task.head
        object.__setattr__(self, "_task", task)
        self.register_buffer("class_emb", None if class_emb is None else class_emb.detach().clone())

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self._task.logits(self.backbone, pixel_values, self.class_emb)


class PairScorer(nn.Module):
    """Joint (fusion) scoring of pairs: (pixel_values, input_ids) -> (scores (B,), image_embeds, text_embeds)."""

    def __init__(self, backbone):
        super().__init__()
        self.backbone = backbone

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor):
        img, txt = self.backbone.encode_pair(pixel_values, input_ids, normalize=True)
        return self.backbone.logit_scale * (img * txt).sum(-1), img, txt


class HalfPrecision(nn.Module):
    """Runs `module` in float16 with float32 inputs and outputs (the fp16 graphs keep fp32 I/O)."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module.half()

    def forward(self, *args):
        args = tuple(a.half() if a.is_floating_point() else a for a in args)
        out = self.module(*args)
        if isinstance(out, tuple):
            return tuple(o.float() for o in out)
        return out.float()
