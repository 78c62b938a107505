"""Inference with a composition (`vlkit compose run`): pick the adapter (explicitly or by the router) per
input and answer with that adapter's task: class scores, a VQA answer, or an image-text score. On a generative
backbone `generate_with` writes text (a caption, an answer) for each image and prompt through an adapter, an
`a+b` stack or a composition (stack, average, parallel, merge: their adapters active together on every site).

The task of an adapter is rebuilt from its `task.json` (class names and prompt, answer set, ...) and its
trained head from `head.safetensors`, so no training data is needed at inference.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..adapters.files import read_tensor_file
from ..adapters.model import AdaptedModel
from ..errors import ConfigError
from ..plugins import registry
from .composition import Composition
from .resolve import AdapterResolver, load_composition
from .router import route as predict_route


def load_task(backbone, meta: dict[str, Any] | None, head: Path | None = None):
    """The task object an adapter was trained with, from its task.json metadata and head file."""

    if not meta or not meta.get("name"):
        return None
    task = registry("task").get(meta["name"])(backbone, None, **(meta.get("options") or {}))
    if head is not None:
        task.load_head_state(read_tensor_file(head))
    return task


def _answer(backbone, task, pixels: torch.Tensor, tokens: torch.Tensor | None, top: int) -> dict[str, Any]:
    """The task's own prediction (`Task.answer`); without a task, the image-text score when a text is given."""
    with torch.no_grad():
        if task is not None:
            return task.answer(backbone, pixels, tokens, top)
        out: dict[str, Any] = {"task": None}
        if tokens is not None:
            img = backbone.encode_image(pixels, normalize=True)
            txt = backbone.encode_text(tokens, normalize=True)
            out["score"] = round(float(backbone.logit_scale) * float((img * txt).sum()), 4)
        return out


def _task_for(comp: Composition, backbone, name: str | None, cache: dict) -> Any:
    key = name or "__composition__"
    if key not in cache:
        info = (
            comp.tasks.get(name)
            if name
            else (
                comp.tasks.get("__fusion__")
                or next((comp.tasks[n] for n in reversed(comp.names) if (comp.tasks.get(n) or {}).get("meta")), {})
            )
        )
        info = info or {}
        cache[key] = load_task(backbone, info.get("meta"), info.get("head"))
    return cache[key]


def run_composition(
    backbone,
    path: str | Path,
    images: list,
    texts: list[str] | None = None,
    *,
    adapter: str | None = None,
    task: str | None = None,
    route: str | None = None,
    top: int = 3,
) -> dict[str, Any]:
    """Predictions for `images` (PIL) and optional `texts` (one, or one per image) with a composition."""
    comp = load_composition(backbone, path, activate=False)
    if texts and len(texts) not in (1, len(images)):
        raise ConfigError(f"{len(texts)} texts for {len(images)} images: give one, or one per image")
    texts = (texts * len(images) if texts and len(texts) == 1 else texts) or None
    pixels = backbone.preprocess_batch(images)
    tokens = backbone.tokenize(texts) if texts else None
    if route not in (None, "auto"):
        raise ConfigError(f"--route takes 'auto', got {route!r}")
    if route == "auto":
        if comp.router is None:
            raise ConfigError(f"{path} has no router: build one with `vlkit compose A,B --mode route -o DIR`")

        idx = predict_route(backbone, comp.router, pixels, tokens).tolist()
        chosen = [comp.router.names[i] for i in idx]
    elif adapter is not None or task is not None:
        chosen = [comp.pick(adapter, task)] * len(images)
    elif comp.mode == "route":
        raise ConfigError(f"{path} routes per input: pass --route auto, --adapter NAME or --task TASK")
    else:
        chosen = [None] * len(images)
    rows: list[dict[str, Any]] = []
    cache: dict[Any, Any] = {}
    for i, name in enumerate(chosen):
        if name is None and comp.mode != "route":
            comp.activate(backbone)
            label = f"{comp.mode}({', '.join(comp.names)})"
        else:
            AdaptedModel.of(backbone).set_adapter(name)
            label = name or "none (frozen backbone)"
        t = _task_for(comp, backbone, name, cache) if (name is not None or comp.mode != "route") else None
        tok = tokens[i : i + 1] if tokens is not None else None
        row = {"input": i, "adapter": label}
        row.update(
            _answer(backbone, t, pixels[i : i + 1], tok, top)
            if t is not None
            else _answer(backbone, None, pixels[i : i + 1], tok, top)
        )
        rows.append(row)
    return {"composition": str(path), "mode": comp.mode, "route": route, "predictions": rows}


GENERATIVE_MODES = ("stack", "parallel", "merge", "average")


def generate_with(
    backbone,
    target: str | Path,
    images: list,
    prompts: list[str],
    *,
    adapter: str | None = None,
    task: str | None = None,
    max_new_tokens: int = 20,
    num_beams: int = 1,
) -> dict[str, Any]:
    """Generated text for each image (PIL) and its prompt (one prompt for all, or one per image) on a generative
    backbone, through `target`: an adapter or run directory, `a+b`, a composition directory, or `backbone`."""
    if not prompts or len(prompts) not in (1, len(images)):
        raise ConfigError(f"{len(prompts)} prompts for {len(images)} images: give one, or one per image")
    if max_new_tokens < 1 or num_beams < 1:
        raise ConfigError("--max-new-tokens and --num-beams must be at least 1")
    prompts = list(prompts) * len(images) if len(prompts) == 1 else list(prompts)
    system = AdapterResolver(backbone).resolve(str(target))
    comp = system.composition
    if adapter is not None or task is not None:
        if comp is None:
            raise ConfigError(f"--adapter and --task pick an adapter of a composition; {target} is not one")
        chosen = comp.pick(adapter, task)
        AdaptedModel.of(backbone).set_adapter(chosen)
        label = chosen
    elif system.mode not in GENERATIVE_MODES:
        raise ConfigError(
            f"{target} is a {system.mode} composition: on generative backbone {backbone.spec} pass "
            "--adapter NAME (its router or fusion reads dual-encoder embeddings)"
        )
    else:
        system.activate(backbone)
        label = system.label if len(system.names) < 2 else f"{system.mode}({', '.join(system.names)})"
    device = next(iter(backbone.parameters())).device
    pixels = backbone.preprocess_batch(images).to(device)
    texts = backbone.generate(pixels, prompts, max_new_tokens=int(max_new_tokens), num_beams=int(num_beams))
    rows = [
        {"input": i, "adapter": label if system.names or adapter else "none (frozen backbone)", "prompt": p, "text": t}
        for i, (p, t) in enumerate(zip(prompts, texts))
    ]
    return {
        "target": str(target),
        "mode": system.mode,
        "max_new_tokens": int(max_new_tokens),
        "num_beams": int(num_beams),
        "predictions": rows,
    }
