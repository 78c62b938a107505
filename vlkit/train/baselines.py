"""Few-shot protocol pieces that hold no task or method name: the L-BFGS linear probe, base-to-novel class splits,
scores of a trained backbone on other data (novel classes, the general domain) and the run record.

- `linear_probe`: CLIP's linear probe (`vlkit.train.logreg`) on the frozen image features of the few-shot
  set, C searched on the few-shot validation set (C = 1, scikit-learn's default, where there is none), the
  fitted weights put into the task's linear head and scored on the test set;
- `class_split` / `keep_classes`: CoCoOp's base-to-novel protocol: the first half of the classes (label order,
  the odd one to base) trains, the test set is scored on the base and on the novel classes separately;
- `score_on`: the primary metric of a fresh task (the text head, class names from `ds`) on `ds` with the
  backbone as it is (its adapters active);
- `write_run_metrics`: a run's metrics.json with the final output directory and percentages to 2 decimals.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from ..io import save_safetensors, write_json
from ..plugins import registry
from ..tasks.base import batches, device_of
from ..tasks.features import CACHE
from .evaluate import round_percent
from .logreg import fit_logistic, search_c

FROZEN = {"vision", "text"}


def image_features(backbone, task, ds) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised frozen image embeddings (N, D) and labels (N,) of `ds` prepared by `task` (through the cache)."""
    data = task.cache_features(backbone, task.prepare(backbone, ds), FROZEN, CACHE)
    px = data["pixels"]
    if not (isinstance(px, torch.Tensor) and px.dim() == 2 and px.is_floating_point()):
        device = device_of(backbone)
        with torch.no_grad():
            px = torch.cat(
                [
                    backbone.encode_image(b["p"].to(device), normalize=False).float().cpu()
                    for b in batches({"p": px}, 256)
                ]
            )
    return F.normalize(px.float(), dim=-1), data["labels"]


def linear_probe(backbone, task, train_ds, eval_ds, val_ds, out: Path) -> dict[str, Any]:
    """Fit the task's linear head by L-BFGS logistic regression, C searched on `val_ds` (None: C = 1); write
    head.safetensors and task.json into `out`; return the score, the chosen C and the search."""
    num = len(task.metadata()["options"]["class_names"])
    x, y = image_features(backbone, task, train_ds)
    if val_ds is not None:
        xv, yv = image_features(backbone, task, val_ds)
        fit, tried = search_c(x, y, xv, yv, num)
    else:
        fit, tried = fit_logistic(x, y, num, 1.0), []
    linear = task.head.linear
    with torch.no_grad():
        linear.weight.copy_(fit.weight.to(linear.weight.dtype))
        linear.bias.copy_(fit.bias.to(linear.bias.dtype))
    with torch.no_grad():
        metrics = task.evaluate(backbone, task.prepare(backbone, eval_ds))
    out.mkdir(parents=True, exist_ok=True)
    save_safetensors(task.head_state(), out / "head.safetensors")
    write_json(out / "task.json", task.metadata())
    trainable = sum(p.numel() for p in task.head.parameters())
    train_acc = 100.0 * float((fit.logits(x).argmax(-1) == y).double().mean())
    return {
        "score": metrics[task.metric],
        "metrics": metrics,
        "parameters": {"trainable": trainable},
        "C": fit.c,
        "C_search": tried,
        "lbfgs_iterations": fit.iterations,
        "train_accuracy": train_acc,
        "C_source": "validation" if val_ds is not None else "default",
    }


def class_split(names: list[str]) -> tuple[list[str], list[str]]:
    """CoCoOp's split: the first ceil(C/2) classes are base, the rest novel."""
    if len(names) < 2:
        raise ConfigError(f"base-to-novel needs at least two classes, the data has {len(names)}")
    half = math.ceil(len(names) / 2)
    return list(names[:half]), list(names[half:])


def _names_of(ds) -> list[str]:
    feat = ds.features.get("label")
    names = getattr(feat, "names", None)
    if not names:
        raise ConfigError("base-to-novel needs class names on the data (a ClassLabel label column)")
    return list(names)


def keep_classes(ds, keep: list[str]):
    """The rows of `ds` whose label is one of the class names `keep`."""
    names = _names_of(ds)
    wanted = {i for i, n in enumerate(names) if n in set(keep)}
    labels = ds["label"]
    return ds.select([i for i, v in enumerate(labels) if v in wanted])


def dataset_classes(ds) -> list[str]:
    return _names_of(ds)


def score_on(backbone, task_name: str, ds, options: dict[str, Any], class_names: list[str] | None = None) -> float:
    """The primary metric of a fresh `task_name` task (no head: the zero-shot form) on `ds`."""
    cls = registry("task").get(task_name)
    opts = {k: v for k, v in options.items() if k not in ("head", "class_names")}
    if class_names is not None:
        opts["class_names"] = list(class_names)
    task = cls(backbone, ds, **opts)
    with torch.no_grad():
        return float(task.evaluate(backbone, task.prepare(backbone, ds))[task.metric])


def write_run_metrics(where: Path, final: Path, extra: dict[str, Any]) -> dict[str, Any]:
    """metrics.json of a run in `where` (the engine's, or a new one) with `extra`, its output_dir the final
    directory `final` (not the staging one it was written in), percentages rounded."""
    path = where / "metrics.json"
    result = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    result.update(extra)
    result["output_dir"] = str(final)
    result = round_percent(result)
    where.mkdir(parents=True, exist_ok=True)
    write_json(path, result)
    return result
