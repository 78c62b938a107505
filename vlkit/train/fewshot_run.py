"""One run of the few-shot protocol (`vlkit.train.fewshot`): a method's recipe, its fit (trained through the
engine, CLIP's L-BFGS linear probe, or training-free as Tip-Adapter) and its row of scores: in-domain (base and
novel classes under base-to-novel), general domain and retention, behind the domain gate, other domains.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vlkit.backbones.loading import load_backbone

from ..adapters.model import AdaptedModel
from ..adapters.tip_adapter import build_tip_adapter
from ..data.api import parse_data_spec
from ..plugins import registry
from .adapt import BASE_METHODS, DATA_KIND, DEFAULT_LR, world_train_spec
from .baselines import (
    class_split,
    dataset_classes,
    keep_classes,
    linear_probe,
    score_on,
    validation_split,
    write_run_metrics,
)
from .crossdomain import CrossDomain
from .engine import run
from .jobs import build_task, load_datasets
from .recipe import load_recipe, plain
from .retention import gated_scores

GATED_KEYS = ("gated_accuracy", "gated_general", "gated_retention", "gated_routed")
TRAINING_FREE = ("tip-adapter",)
HEAD_METHODS = ("linear", "linear-sgd", "full")  # a trained linear head: no score on classes it never saw


def _protocol_data(data, domain: str, shots: int, seed: int, n_eval: int) -> tuple[dict, dict]:
    """(train spec with `shots`, eval spec) for the embedded world's `domain` or a data spec (e.g. coop:DIR)."""
    if data is None:
        train = world_train_spec(domain, shots, seed)
        return train, {
            "kind": DATA_KIND,
            "domain": domain,
            "task": "classification",
            "n": n_eval,
            "seed": seed + 10_000,
        }

    spec = parse_data_spec(data)
    spec.pop("split", None)
    return {**spec, "split": "train", "shots": shots}, {**spec, "split": "test"}


def method_recipe(
    backbone: str,
    method: str,
    train: dict,
    eval_: dict,
    steps: int,
    seed: int,
    shots: int,
    adapter_options: dict | None = None,
    lr: float | None = None,
    batch_size: int | None = None,
    task_options: dict | None = None,
) -> dict:
    """The recipe of one protocol run. Adapter variants classify with the text head (class-name prompts through
    the possibly adapted text tower, as the CLIP-adaptation papers do); the linear probes and full fine-tuning
    a linear head initialised from those prompts (`linear` fits it by L-BFGS, `vlkit.train.baselines`; recipe
    method `linear-sgd` trains it by SGD)."""

    is_variant = method not in BASE_METHODS
    kind = "adapter" if is_variant else method
    training_free = is_variant and getattr(registry("adapter").get(method), "training_free", False)
    options = dict(task_options or {})
    if kind in HEAD_METHODS:
        options["head"] = "linear"
    return {
        "name": f"fewshot-{method}",
        "backbone": backbone,
        "method": kind,
        "adapter": {"variant": method if is_variant else "bottleneck", **(adapter_options or {})},
        "task": {"name": "classification", "options": options},
        "data": {"train": train, "eval": eval_},
        "optim": {
            "lr": lr or DEFAULT_LR.get(kind, 1e-3),
            "steps": 0 if training_free or kind == "zeroshot" or method == "linear" else steps,
            "batch_size": batch_size or min(32, max(1, shots) * 4),
            "warmup_steps": 0,
            "schedule": "cosine",
        },
        "eval": {"every_steps": 0},
        "checkpoint": {"every_steps": 0},
        "seed": seed,
        "logging": {"tensorboard": False},
    }


def protocol_val(cfg, shots: int, seed: int):
    """CoOp's few-shot validation set: min(shots, 4) examples per class (fewer where the split has fewer), from
    the source's val split (a world source: a fresh draw with its own seed). None where the source has no val
    split or a class has no val example (`vlkit.train.baselines.validation_split`)."""
    return validation_split(plain(cfg.data.train), cfg.task.name, seed, shots)


def _run_training_free(cfg, method: str, out: Path, shots: int, datasets=None) -> tuple[dict[str, Any], Any]:
    """Tip-Adapter: the cache built from the few-shot set with no training (`build_tip_adapter`), α and β
    searched on the few-shot validation set (`protocol_val`), then evaluated on the test set."""

    bb = load_backbone(cfg.backbone)
    train_ds, eval_ds = datasets or load_datasets(cfg)
    task = build_task(bb, cfg, train_ds)
    val = _val_for(cfg, shots, datasets)
    record = build_tip_adapter(bb, train_ds, task=task, name="tip", variant=method, val=val)
    with torch.no_grad():
        metrics = task.evaluate(bb, task.prepare(bb, eval_ds))
    AdaptedModel.of(bb).save_adapter(out, name="tip", task=record.task)
    return {
        "score": metrics[task.metric],
        "metrics": metrics,
        "parameters": {"trainable": 0},  # buffers only
        "alpha": record.config["alpha"],
        "beta": record.config["beta"],
    }, bb


def _val_for(cfg, shots: int, datasets):
    """The few-shot validation set, restricted to the training classes under base-to-novel."""
    val = protocol_val(cfg, shots, int(cfg.seed))
    names = cfg.task.options.get("class_names")
    if val is not None and datasets is not None and names:
        val = keep_classes(val, list(names))
    return val


def _run_linear(cfg, out: Path, shots: int, datasets=None) -> tuple[dict[str, Any], Any]:
    """CLIP's linear probe: L-BFGS logistic regression on frozen features, C searched on the few-shot val set."""
    bb = load_backbone(cfg.backbone)
    train_ds, eval_ds = datasets or load_datasets(cfg)
    task = build_task(bb, cfg, train_ds)
    return linear_probe(bb, task, train_ds, eval_ds, _val_for(cfg, shots, datasets), out), bb


@dataclass
class ProtocolSettings:
    """What every run of one protocol shares."""

    backbone: str
    data: str | None
    domain: str
    n_eval: int
    steps: int | None
    lr: float | None
    batch_size: int | None
    adapter_options: dict | None
    task_options: dict
    protocol: str
    general: Any
    progress: Any
    cross: CrossDomain | None = None  # other domains, scored at `cross.shots` (the largest shot count)
    gate: bool = True  # adapter runs also scored behind a domain gate (vlkit.train.retention)


def one_run(
    s: ProtocolSettings, method: str, k: int, seed: int, where: Path, final: Path, general: tuple[Any, float] | None
) -> dict[str, Any]:
    """One (method, shots, seed) run: train or fit, score in-domain (base and novel classes under base2novel) and
    on the general domain, write its metrics.json; returns its row."""
    train, eval_ = _protocol_data(s.data, s.domain, k, seed, s.n_eval)
    n_steps = s.steps or max(60, 6 * k)

    def recipe(options):
        return load_recipe(
            None,
            base=method_recipe(
                s.backbone, method, train, eval_, n_steps, seed, k, s.adapter_options, s.lr, s.batch_size, options
            ),
            allow_untrained=method in TRAINING_FREE or method == "linear",
        )

    cfg = recipe(s.task_options)
    datasets, novel = None, None
    if s.protocol == "base2novel":
        train_ds, eval_ds = load_datasets(cfg)
        base, novel_names = class_split(dataset_classes(eval_ds))
        datasets = (keep_classes(train_ds, base), keep_classes(eval_ds, base))
        novel = (keep_classes(eval_ds, novel_names), novel_names)
        cfg = recipe({**s.task_options, "class_names": base})
    t0 = time.perf_counter()
    if method in TRAINING_FREE:
        res, bb = _run_training_free(cfg, method, where, k, datasets)
    elif method == "linear":
        res, bb = _run_linear(cfg, where, k, datasets)
    else:
        res, bb, run_task = run(cfg, where, progress=s.progress, publish=False, datasets=datasets)
    seconds = time.perf_counter() - t0
    trains = method not in TRAINING_FREE and method not in ("zeroshot", "linear")
    hyper: dict[str, Any] = {
        "lr": float(cfg.optim.lr) if trains else None,
        "steps": n_steps if trains else 0,
        "batch_size": int(cfg.optim.batch_size) if trains else None,
        **{h: res[h] for h in ("alpha", "beta", "C") if h in res},
    }
    row: dict[str, Any] = {
        "method": method,
        "shots": k,
        "seed": seed,
        "accuracy": float(res["score"]),
        "trainable": int(res.get("parameters", {}).get("trainable", 0)),
        "seconds": seconds,
        "steps": hyper["steps"],
        "hyperparameters": hyper,
        **{h: res[h] for h in ("alpha", "beta", "C") if h in res},
    }
    if novel is not None:
        row["base"] = row["accuracy"]
        row["novel"] = (
            None if method in HEAD_METHODS else score_on(bb, "classification", novel[0], s.task_options, novel[1])
        )
        if row["novel"] is not None:
            row["hm"] = harmonic_mean(row["base"], row["novel"])
    if general is not None:
        score = (
            general[1]
            if method in ("zeroshot", "linear", "linear-sgd")
            else score_on(bb, "classification", general[0], s.task_options)
        )
        row["general"] = score
        row["retention"] = 100.0 * score / general[1] if general[1] else None
    if s.gate and trains and method not in BASE_METHODS:  # an adapter: also behind its domain gate
        gen = general
        train_ds, eval_ds = datasets or load_datasets(cfg)
        row.update(
            gated_scores(
                bb,
                run_task,
                train_ds,
                eval_ds,
                None if gen is None else lambda view: score_on(view, "classification", gen[0], s.task_options),
            )
        )
        if gen is not None and gen[1]:
            row["gated_retention"] = 100.0 * row["gated_general"] / gen[1]
    if s.cross is not None and k == s.cross.shots:  # the run's model on the other domains
        row.update(s.cross.entry(bb, where, s.task_options))
    write_run_metrics(
        where,
        final,
        {
            "protocol": s.protocol,
            "shots": k,
            "seed": seed,
            "hyperparameters": hyper,
            **{key: row[key] for key in ("base", "novel", "hm", "general", "retention", *GATED_KEYS) if key in row},
            **(s.cross.record(row.get("cross")) if s.cross is not None else {}),
            **(
                {}
                if (where / "metrics.json").is_file()
                else {
                    "method": method,
                    "score": res["score"],
                    "metrics": res.get("metrics"),
                    "parameters": res.get("parameters"),
                    "train_time_s": seconds,
                }
            ),
        },
    )
    return row


def harmonic_mean(a: float, b: float) -> float:
    """CoCoOp's H: 2ab / (a + b) (0 when both are 0)."""
    return 2 * a * b / (a + b) if a + b else 0.0
