"""Few-shot protocol pieces that hold no task or method name: the L-BFGS linear probe, base-to-novel class splits,
scores of a trained backbone on other data (novel classes, the general domain) and the run record.

- `fit_linear_head`: CLIP's linear probe (`vlkit.train.logreg`) on the frozen image features of the training
  set, C searched on a validation set (C = 1, scikit-learn's default, where there is none), the fitted weights
  put into the task's linear head: what recipe method `linear` and `vlkit adapt --method linear` both run;
  `linear_probe` fits, scores on the test set and writes the head; `validation_split` is the validation set
  (CoOp's few-shot one for a few-shot source);
- `class_split` / `keep_classes`: CoCoOp's base-to-novel protocol: the first half of the classes (label order,
  the odd one to base) trains, the test set is scored on the base and on the novel classes separately;
- `score_on`: the primary metric of a fresh task (the text head, class names from `ds`) on `ds` with the
  backbone as it is (its adapters active);
- `write_run_metrics`: a run's metrics.json with the final output directory and percentages to 2 decimals.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..data.api import few_shot, load_data
from ..data.kinds import kind_domains
from ..data.shots import kind_draws_shots
from ..errors import ConfigError, DataError
from ..io import save_safetensors, write_json
from ..plugins import registry
from ..tasks.base import batches, device_of
from ..tasks.features import CACHE
from .evaluate import round_percent
from .logreg import fit_logistic, search_c

FROZEN = {"vision", "text"}


def image_features(backbone, task, ds, cache: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised frozen image embeddings (N, D) and labels (N,) of `ds` prepared by `task` (through the feature
    cache unless `cache` is False)."""
    data = task.prepare(backbone, ds)
    if cache:
        data = task.cache_features(backbone, data, FROZEN, CACHE)
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


def fit_linear_head(backbone, task, train_ds, val_ds, c: float | None = None, cache: bool = True) -> dict[str, Any]:
    """Fit the task's linear head (`task.head.linear`, an `nn.Linear` over the normalised image embedding) by L-BFGS
    logistic regression on the frozen image features of `train_ds`: at `c` when given, else C searched on `val_ds`,
    else C = 1. Returns what the fit records: C, where it came from, the search, the iterations, train accuracy."""
    linear = getattr(task.head, "linear", None)
    if not isinstance(linear, torch.nn.Linear):
        raise ConfigError(
            f"the L-BFGS linear probe fits a linear classifier on the image features; task {task.name!r} "
            "has no such head (task.head.linear)",
            hint="method linear-sgd trains any task head by SGD",
        )
    num = linear.out_features
    x, y = image_features(backbone, task, train_ds, cache)
    tried: list[dict[str, float]] = []
    if c is not None:
        fit, source = fit_logistic(x, y, num, float(c)), "given"
    elif val_ds is not None:
        xv, yv = image_features(backbone, task, val_ds, cache)
        (fit, tried), source = search_c(x, y, xv, yv, num), "validation"
    else:
        fit, source = fit_logistic(x, y, num, 1.0), "default"
    with torch.no_grad():
        linear.weight.copy_(fit.weight.to(linear.weight.dtype))
        linear.bias.copy_(fit.bias.to(linear.bias.dtype))
    keep = y >= 0
    train_acc = 100.0 * float((fit.logits(x[keep]).argmax(-1) == y[keep]).double().mean()) if keep.any() else 0.0
    return {
        "C": fit.c,
        "C_source": source,
        "C_search": tried,
        "lbfgs_iterations": fit.iterations,
        "train_accuracy": train_acc,
    }


def linear_probe(backbone, task, train_ds, eval_ds, val_ds, out: Path) -> dict[str, Any]:
    """`fit_linear_head` with C searched on `val_ds` (None: C = 1), scored on `eval_ds`; writes head.safetensors
    and task.json into `out`; returns the score with the fit's record."""
    fit = fit_linear_head(backbone, task, train_ds, val_ds)
    with torch.no_grad():
        metrics = task.evaluate(backbone, task.prepare(backbone, eval_ds))
    out.mkdir(parents=True, exist_ok=True)
    save_safetensors(task.head_state(), out / "head.safetensors")
    write_json(out / "task.json", task.metadata())
    trainable = sum(p.numel() for p in task.head.parameters())
    return {"score": metrics[task.metric], "metrics": metrics, "parameters": {"trainable": trainable}, **fit}


def validation_split(spec: dict[str, Any], task_name: str, seed: int, shots: int | None = None):
    """The validation set of a training source `spec` (a data spec): its `val` (or `validation`) split; for a
    generated kind (one that declares domains: the embedded world) a fresh draw with seed + 20000. With `shots`,
    CoOp's few-shot validation set: min(shots, 4) examples per class (fewer where the split has fewer), drawn with
    `seed`. None where the source has none or a class has no validation example."""
    spec = dict(spec)
    if kind_draws_shots(spec):
        spec.pop("seed", None)  # the seed of its own draw: the val draw below has its own
    spec.pop("shots", None)
    spec.pop("split", None)
    spec.setdefault("task", task_name)
    kind = spec.get("kind")
    generated = isinstance(kind, str) and kind in registry("dataset") and kind_domains(kind) is not None
    tries = [{**spec, "seed": seed + 20_000}] if generated else [{**spec, "split": s} for s in ("val", "validation")]
    ds = None
    for attempt in tries:
        try:
            ds = load_data(attempt)
            break
        except (DataError, ConfigError):
            continue
    if ds is None or "label" not in ds.column_names:
        return None
    counts = Counter(ds["label"])
    feat = ds.features["label"]
    classes = len(feat.names) if hasattr(feat, "names") else len(counts)
    least = min(counts.values(), default=0)
    k = least if shots is None else min(shots, 4, least)
    if k < 1 or len(counts) < classes:  # a class missing from the val split: no search (the paper's defaults)
        return None
    return ds if shots is None else few_shot(ds, k, seed=seed)


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
