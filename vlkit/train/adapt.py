"""Domain adaptation from few shots: a domain adapter against zero-shot, linear probe and full fine-tuning,
with the general-domain (photo) score measured with the adapter off (verified unchanged) and on.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vlkit.backbones.loading import load_backbone

from ..adapters.model import AdaptedModel
from ..adapters.tip_adapter import build_tip_adapter
from ..data.api import load_data, parse_data_spec
from ..data.kinds import kind_domains
from ..data.pipeline import materialize
from ..errors import ConfigError
from ..io import write_json
from ..outputs import OutputTarget
from ..plugins import registry
from .baselines import (
    class_split,
    dataset_classes,
    keep_classes,
    linear_probe,
    score_on,
    validation_split,
    write_run_metrics,
)
from .crossdomain import CrossDomain, data_targets, domain_targets
from .engine import run
from .evaluate import load_eval_data, round_percent
from .jobs import build_task, load_datasets
from .recipe import as_recipe, load_recipe, plain
from .retention import gated_adapter, gated_scores

GATED_KEYS = ("gated_accuracy", "gated_general", "gated_retention", "gated_routed")
DATA_KIND = "world"  # the dataset kind adapt trains and evaluates on; its registry entry declares the domains
GENERAL_DOMAIN = "photo"


def adapt_recipe(
    backbone: str,
    domain: str,
    shots: int,
    method: str,
    variant: str,
    steps: int,
    seed: int,
    n_eval: int,
    adapter_options: dict[str, Any] | None = None,
    lr: float | None = None,
    batch_size: int | None = None,
    task_options: dict | None = None,
) -> dict:
    default_lr = DEFAULT_LR.get(method, 1e-3)
    options = {**(task_options or {}), **({} if method == "zeroshot" else {"head": "linear"})}
    train = {
        "kind": DATA_KIND,
        "domain": domain,
        "task": "classification",
        "n": max(400, shots * 40),
        "seed": seed,
        "shots": shots,
    }
    return {
        "name": f"{domain}-{method}",
        "backbone": backbone,
        "method": method,
        "adapter": {"variant": variant, **(adapter_options or {})},
        "task": {"name": "classification", "options": options},
        "data": {
            "train": train,
            "eval": {"kind": DATA_KIND, "domain": domain, "task": "classification", "n": n_eval, "seed": seed + 10_000},
        },
        "optim": {
            "lr": lr or default_lr,
            "steps": steps,
            "batch_size": batch_size or min(32, shots * 4),
            "warmup_steps": 0,
            "schedule": "cosine",
        },
        "seed": seed,
        "logging": {"tensorboard": False},
    }


def _general_eval(backbone, cfg, n_eval: int, seed: int):
    """Photo-domain zero-shot classification accuracy (class prompts through the text tower) and the
    logits, to verify that 'adapter off' is exactly the frozen model."""

    ds = load_data(
        {"kind": DATA_KIND, "domain": GENERAL_DOMAIN, "task": "classification", "n": n_eval, "seed": seed + 20_000}
    )
    cfg = dataclasses.replace(as_recipe(cfg), method="zeroshot")
    cfg.task = dataclasses.replace(cfg.task, options={})
    task = build_task(backbone, cfg, ds)
    data = task.prepare(backbone, ds)
    with torch.no_grad():
        metrics = task.evaluate(backbone, data)
        logits = task.logits(backbone, materialize(data)["pixels"])
    return metrics[task.metric], logits


def world_cross(
    eval_domains, domain: str, n_eval: int, seed: int, shots: int | None = None, split: str | None = None
) -> CrossDomain:
    """`--eval-domains` (names, `all`: every other domain) of the embedded world: each domain's test draw, drawn as
    the general domain's (`n_eval` images, seed + 20000, `split`), so the photo column equals the general one where
    the classes differ (`vlkit.train.crossdomain`)."""
    spec = {"kind": DATA_KIND, "task": "classification", "n": n_eval, "seed": seed + 20_000}
    if split is not None:
        spec["split"] = split
    known = kind_domains(DATA_KIND) or ()
    return domain_targets(eval_domains, source=domain, known=known, spec=spec, task="classification", shots=shots)


def _gated_eval(cfg, n_eval: int, seed: int, cross: CrossDomain, optim: dict, out: Path):
    """What a gated adapter's row measures through the gate's view: the general score and the cross entry."""
    return lambda view: (_general_eval(view, cfg, n_eval, seed)[0], cross.entry(view, out, optim["task_options"]))


def run_adapt(
    backbone: str = "tiny",
    domain: str = "medical",
    shots: int = 16,
    out: str | Path = "runs/adapt",
    variant: str = "bottleneck",
    baselines: tuple[str, ...] = (),
    steps: int | None = None,
    seed: int = 0,
    n_eval: int = 400,
    adapter_options: dict | None = None,
    progress: Any = True,
    overwrite: bool = False,
    lr: float | None = None,
    batch_size: int | None = None,
    task_options: dict | None = None,
    eval_domains: str | list[str] | None = None,
    gate: bool = True,
) -> dict[str, Any]:
    """Few-shot adaptation into `out` (written whole, `vlkit.outputs`: a non-empty one needs `overwrite`).
    With `gate` (default) the adapter is also written behind a domain gate calibrated on its training set
    (`vlkit.train.retention`) into `out/gated/`, and its row and metrics.json's `gated` give its in-domain score and
    the general domain's retention.
    `lr`, `batch_size` and `task_options` (prompt or templates) reach the adapter's recipe; metrics.json records
    them with the general-domain score and retention (percent of the frozen backbone's). `eval_domains` (world
    domains, `all`: every other one) adds each row's accuracy on those domains (`cross`), the frozen backbone's
    zero-shot accuracy there in the first row."""

    cross = world_cross(eval_domains, domain, n_eval, seed)
    with OutputTarget(out, overwrite=overwrite, what="adapt output directory") as target:
        result = _run_adapt(
            backbone,
            domain,
            shots,
            target.staging,
            variant,
            baselines,
            steps,
            seed,
            n_eval,
            adapter_options,
            progress,
            {"lr": lr, "batch_size": batch_size, "task_options": task_options},
            cross,
            gate=gate,
        )
        row = result["rows"][2]  # the adapter, on
        gated = next((r for r in result["rows"] if "gate" in r), None)
        write_run_metrics(
            target.staging,
            Path(out),
            {
                "hyperparameters": result["hyperparameters"],
                "general_domain": GENERAL_DOMAIN,
                "general": row["general"],
                "general_frozen": result["rows"][0]["general"],
                "retention": row["retention"],
                **cross.record(row.get("cross")),
                **(
                    {"gated": {k: gated[k] for k in ("in_domain", "general", "retention", "gate")}}
                    if gated is not None
                    else {}
                ),
            },
        )
    result["adapter_dir"] = str(out)
    return round_percent(result)


def _run_adapt(
    backbone,
    domain,
    shots,
    out,
    variant,
    baselines,
    steps,
    seed,
    n_eval,
    adapter_options,
    progress,
    optim: dict,
    cross: CrossDomain,
    gate: bool = True,
) -> dict[str, Any]:

    domains = kind_domains(DATA_KIND) or ()
    if domain not in domains:
        raise ConfigError(f"unknown domain {domain!r}; known: {', '.join(domains)}")
    if domain == GENERAL_DOMAIN:
        raise ConfigError(f"{GENERAL_DOMAIN!r} is the general (pre-training) domain; adapt to another one")
    for b in baselines:
        if b not in ("full", "linear", "linear-sgd"):
            raise ConfigError(f"unknown baseline {b!r}; choose from full, linear, linear-sgd")
    out = Path(out)
    steps = steps or max(60, 6 * shots)
    rows: list[dict[str, Any]] = []

    def cfg_for(method: str):
        return load_recipe(
            None,
            base=adapt_recipe(
                backbone,
                domain,
                shots,
                method,
                variant,
                steps,
                seed,
                n_eval,
                adapter_options,
                optim["lr"],
                optim["batch_size"],
                optim["task_options"],
            ),
        )

    zs_cfg = cfg_for("zeroshot")
    zs, zs_backbone, _ = run(zs_cfg, out / "zeroshot", progress=False, publish=False)
    photo_frozen, photo_frozen_logits = _general_eval(zs_backbone, zs_cfg, n_eval, seed)
    rows.append(
        {
            "method": "zero-shot (frozen)",
            "trainable_percent": 0.0,
            "in_domain": zs["score"],
            "general": photo_frozen,
            "general_change": 0.0,
            **cross.frozen_entry(zs_backbone, optim["task_options"]),
        }
    )

    ad_cfg = cfg_for("adapter")
    ad, ad_backbone, ad_task = run(ad_cfg, out, progress=progress, publish=False)
    photo_on, _ = _general_eval(ad_backbone, ad_cfg, n_eval, seed)
    on_cross = cross.entry(ad_backbone, out, optim["task_options"])  # before the adapter goes off
    measure = _gated_eval(ad_cfg, n_eval, seed, cross, optim, out)  # behind a gate (vlkit.train.retention)
    gated = gated_adapter(ad_backbone, ad_task, ad_cfg, out, photo_frozen, measure, variant, ad) if gate else None
    AdaptedModel.of(ad_backbone).disable_adapters()
    photo_off, photo_off_logits = _general_eval(ad_backbone, ad_cfg, n_eval, seed)
    verified = (
        photo_off == photo_frozen
        and photo_off_logits is not None
        and torch.equal(photo_off_logits, photo_frozen_logits)
    )
    rows.append(
        {
            "method": f"{variant} adapter, off",
            "trainable_percent": 0.0,
            "in_domain": None,
            "general": photo_off,
            "general_change": photo_off - photo_frozen,
            "verified_unchanged": verified,
            **cross.frozen_entry(),
        }
    )
    rows.append(
        {
            "method": f"{variant} adapter, on",
            "trainable_percent": ad["parameters"]["trainable_percent"],
            "in_domain": ad["score"],
            "general": photo_on,
            "general_change": photo_on - photo_frozen,
            **on_cross,
        }
    )
    rows += [gated] if gated is not None else []
    for method in baselines:
        bcfg = cfg_for(method)
        res, bb, _ = run(bcfg, out / f"baseline-{method}", progress=progress, publish=False)
        row = {
            "method": METHOD_LABELS[method],
            "trainable_percent": res["parameters"]["trainable_percent"],
            "in_domain": res["score"],
        }
        if method == "full":
            photo_after, _ = _general_eval(bb, bcfg, n_eval, seed)
            row.update(
                general=photo_after, general_change=photo_after - photo_frozen, forgetting=photo_frozen - photo_after
            )
        else:
            row.update(general=photo_frozen, general_change=0.0)
        rows.append({**row, **cross.entry(bb, out / f"baseline-{method}", optim["task_options"])})
    for row in rows:
        row["retention"] = 100.0 * row["general"] / photo_frozen if photo_frozen else None
    return {
        "backbone": backbone,
        "domain": domain,
        "shots": shots,
        "variant": variant,
        "steps": steps,
        "hyperparameters": {
            "lr": float(ad_cfg.optim.lr),
            "steps": steps,
            "batch_size": int(ad_cfg.optim.batch_size),
            **(optim["task_options"] or {}),
        },
        "metric": "accuracy",
        "general_domain": GENERAL_DOMAIN,
        "adapter_dir": str(out),
        "adapter_off_verified": verified,
        "rows": rows,
        **cross.result_entry(),
    }


# --- the few-shot protocol: methods x shot counts x seeds ---------------------------------------------------------

BASE_METHODS = ("zeroshot", "linear", "linear-sgd", "full")
TRAINING_FREE = ("tip-adapter",)
HEAD_METHODS = ("linear", "linear-sgd", "full")  # a trained linear head: no score on classes it never saw
PROTOCOLS = ("fewshot", "base2novel")
METHOD_LABELS = {
    "zeroshot": "zero-shot",
    "linear": "linear probe (L-BFGS)",
    "linear-sgd": "linear head (SGD)",
    "full": "full fine-tuning",
}
DEFAULT_LR = {"adapter": 2e-3, "full": 1e-4, "linear": 1e-2, "linear-sgd": 1e-2}


def check_methods(methods) -> list[str]:
    """The methods of a protocol run: zeroshot, linear (L-BFGS), linear-sgd, full, tip-adapter or any registered
    adapter variant."""

    reg = registry("adapter")
    methods = [m.strip() for m in methods if m and m.strip()]
    if not methods:
        raise ConfigError("--method names no method")
    for m in methods:
        if m not in BASE_METHODS and m not in reg:
            raise ConfigError(
                f"unknown method {m!r}; methods: {', '.join(BASE_METHODS)} or an adapter variant "
                f"({', '.join(reg.names())})"
            )
    return methods


def parse_ints(text, what: str) -> list[int]:
    """'1,2,4' -> [1, 2, 4] (positive integers), a ConfigError naming `what` otherwise."""
    if isinstance(text, int):
        values = [text]
    else:
        try:
            values = [int(v) for v in str(text).split(",") if v.strip()]
        except ValueError:
            raise ConfigError(f"{what} must be comma-separated integers, got {text!r}") from None
    if not values or any(v < 0 for v in values):
        raise ConfigError(f"{what} must be non-negative integers, got {text!r}")
    return values


def _protocol_data(data, domain: str, shots: int, seed: int, n_eval: int) -> tuple[dict, dict]:
    """(train spec with `shots`, eval spec) for the embedded world's `domain` or a data spec (e.g. coop:DIR)."""
    if data is None:
        train = {
            "kind": DATA_KIND,
            "domain": domain,
            "task": "classification",
            "n": max(400, shots * 40),
            "seed": seed,
            "shots": shots,
        }
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


def _protocol_cross(data, domain: str, eval_domains, eval_data, n_eval: int, seed: int, shots) -> CrossDomain:
    """The protocol's cross-domain targets, scored at the largest shot count: world domains (`eval_domains`,
    without `data`) or other datasets' test sets (`eval_data`, with it)."""
    if data is None and eval_data:
        raise ConfigError("--eval-data takes test sets for a --data run; for the embedded world use --eval-domains")
    if data is not None and eval_domains:
        raise ConfigError("--eval-domains names domains of the embedded world; with --data give --eval-data SPEC,...")
    top = max(shots, default=None)
    if data is None:
        return world_cross(eval_domains, domain, n_eval, seed, top, split="test")  # as the general domain's
    return data_targets(eval_data, source=data, task="classification", shots=top)


def _general_spec(s: ProtocolSettings, seed: int):
    """The general domain's data: `general` as given, else for the world its photo domain, else none."""
    if s.general is not None:
        return s.general
    if s.data is None:
        return {
            "kind": DATA_KIND,
            "domain": GENERAL_DOMAIN,
            "task": "classification",
            "n": s.n_eval,
            "seed": seed + 20_000,
        }
    return None


def _one_run(
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


def run_fewshot(
    backbone: str = "tiny",
    methods=("bottleneck",),
    shots=(1, 2, 4, 8, 16),
    seeds=(1, 2, 3),
    *,
    data: str | None = None,
    domain: str = "medical",
    out: str | Path | None = None,
    steps: int | None = None,
    n_eval: int = 400,
    adapter_options: dict | None = None,
    lr: float | None = None,
    batch_size: int | None = None,
    task_options: dict | None = None,
    protocol: str = "fewshot",
    general: Any = None,
    progress=None,
    overwrite: bool = False,
    plot: bool = True,
    on_run=None,
    eval_domains: str | list[str] | None = None,
    eval_data: str | list[str] | None = None,
    gate: bool = True,
) -> dict[str, Any]:
    """CoOp's few-shot protocol: every method at every shot count over every seed; accuracy mean ± sd per
    (method, shots), trainable parameters and training seconds per run. `data` is a data spec with train and
    test splits (e.g. `coop:DATA/eurosat`); default the embedded world's `domain`. With `out`, each run's
    files go under `out/<method>/<shots>shot-seed<seed>/` and the table (fewshot.json) and plot (fewshot.png)
    beside them (written whole, `vlkit.outputs`).

    `protocol="base2novel"` is CoCoOp's: trained on the first half of the classes, scored on the base and the
    novel classes of the test set and their harmonic mean. `general` (a data spec; default the world's photo
    domain when `data` is None) adds each run's general-domain score and its retention, as a percentage of
    the frozen backbone's. `task_options` (prompt or templates) reach every run's classification task.

    Cross-domain (`vlkit.train.crossdomain`): `eval_domains` (world domains, `all`: every other one; without
    `data`) or `eval_data` (data specs of other test sets; with `data`) adds each run's accuracy there at the
    largest shot count (`cross` in its row, the summary and metrics.json), with the frozen backbone's zero-shot
    accuracy on each (the result's `cross_domain`).

    `gate` (default): each trained adapter run is also scored behind a domain gate calibrated on its training set
    (`vlkit.train.retention`): `gated_accuracy`, `gated_general`, `gated_retention` and `gated_routed` (percent of
    the in-domain test images the gate sends to the adapter) in its row and the summary."""

    methods = check_methods(methods)
    if protocol not in PROTOCOLS:
        raise ConfigError(f"--protocol must be one of {', '.join(PROTOCOLS)}, got {protocol!r}")
    if batch_size is not None and batch_size < 1:
        raise ConfigError(f"--batch-size must be at least 1, got {batch_size}")
    if lr is not None and not lr > 0:
        raise ConfigError(f"--lr must be a positive number, got {lr}")
    shots, seeds = list(shots), list(seeds)
    if data is None:
        domains = kind_domains(DATA_KIND) or ()
        if domain not in domains:
            raise ConfigError(f"unknown domain {domain!r}; known: {', '.join(domains)}")
    s = ProtocolSettings(
        backbone,
        data,
        domain,
        n_eval,
        steps,
        lr,
        batch_size,
        adapter_options,
        dict(task_options or {}),
        protocol,
        general,
        progress,
        _protocol_cross(data, domain, eval_domains, eval_data, n_eval, seeds[0] if seeds else 0, shots),
        gate,
    )
    if out is None:
        import tempfile

        with tempfile.TemporaryDirectory(prefix="vlkit-fewshot-") as tmp:
            return _run_fewshot(s, methods, shots, seeds, Path(tmp), Path(tmp), False, on_run)
    with OutputTarget(out, overwrite=overwrite, what="adapt output directory") as target:
        result = _run_fewshot(s, methods, shots, seeds, target.staging, Path(out), plot, on_run)
    result["out"] = str(out)
    return result


def _summary(runs: list[dict[str, Any]], methods, shots) -> list[dict[str, Any]]:
    import statistics

    def mean(rs, key):
        vals = [r[key] for r in rs if r.get(key) is not None]
        return statistics.fmean(vals) if vals else None

    out: list[dict[str, Any]] = []
    for method in methods:
        for k in shots:
            rs = [r for r in runs if r["method"] == method and r["shots"] == k]
            accs = [r["accuracy"] for r in rs]
            row = {
                "method": method,
                "shots": k,
                "mean": statistics.fmean(accs),
                "sd": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                "seeds": len(accs),
                "trainable": rs[0]["trainable"],
                "seconds": statistics.fmean(r["seconds"] for r in rs),
            }
            for key in ("base", "novel", "hm", "general", "retention", *GATED_KEYS):
                if any(key in r for r in rs):
                    row[key] = mean(rs, key)
            crosses = [r["cross"] for r in rs if "cross" in r]
            if crosses:
                row["cross"] = {d: statistics.fmean(c[d] for c in crosses) for d in crosses[0]}
            out.append(row)
    return out


def _run_fewshot(s: ProtocolSettings, methods, shots, seeds, out: Path, final: Path, plot, on_run) -> dict[str, Any]:
    runs: list[dict[str, Any]] = []
    general = None
    spec = _general_spec(s, seeds[0])
    if spec is not None:
        gen_ds, _ = load_eval_data(spec, "classification")
        general = (gen_ds, score_on(load_backbone(s.backbone), "classification", gen_ds, s.task_options))
    if s.cross is not None and s.cross.targets:
        s.cross.measure_frozen(load_backbone(s.backbone), s.task_options)
    for method in methods:
        for k in shots:
            for seed in seeds:
                rel = Path(method) / f"{k}shot-seed{seed}"
                row = _one_run(s, method, k, seed, out / rel, final / rel, general)
                runs.append(row)
                if on_run is not None:
                    on_run(row)
    summary = _summary(runs, methods, shots)
    result = {
        "backbone": s.backbone,
        "data": s.data or f"{DATA_KIND}:{s.domain}",
        "protocol": s.protocol,
        "methods": methods,
        "shots": shots,
        "seeds": seeds,
        "metric": "accuracy",
        "task_options": s.task_options,
        "summary": summary,
        "runs": runs,
        **(s.cross.result_entry() if s.cross is not None else {}),
    }
    if general is not None:
        result["general"] = {
            "data": s.general if s.general is not None else f"{DATA_KIND}:{GENERAL_DOMAIN}",
            "frozen": general[1],
        }
    result = round_percent(result)
    write_json(out / "fewshot.json", result)
    if plot:
        plot_fewshot(
            summary, out / "fewshot.png", title=f"{result['data']} ({s.backbone}), mean ± sd over {len(seeds)} seed(s)"
        )
        result["plot"] = str(final / "fewshot.png")
    return result


def plot_fewshot(summary: list[dict[str, Any]], path: str | Path, title: str = "") -> Path:
    """Accuracy against shots per class (log2 axis), one line per method with its ± sd band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    methods = list(dict.fromkeys(r["method"] for r in summary))
    cmap: Any = plt.get_cmap("tab10" if len(methods) <= 10 else "tab20")  # a ListedColormap: it has .colors
    colors = cmap.colors
    for i, method in enumerate(methods):
        rs = sorted((r for r in summary if r["method"] == method), key=lambda r: r["shots"])
        xs = [r["shots"] for r in rs]
        ys = [r["mean"] for r in rs]
        sd = [r["sd"] for r in rs]
        (line,) = ax.plot(
            xs,
            ys,
            marker="os^D"[i % 4],
            color=colors[i % len(colors)],
            linestyle="-" if i % 2 == 0 else "--",
            label=METHOD_LABELS.get(method, method),
        )
        ax.fill_between(
            xs, [y - s for y, s in zip(ys, sd)], [y + s for y, s in zip(ys, sd)], alpha=0.15, color=line.get_color()
        )
    if len({r["shots"] for r in summary}) > 1:
        ax.set_xscale("log", base=2)
    ax.set_xticks(sorted({r["shots"] for r in summary}))
    ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.set_xlabel("shots per class")
    ax.set_ylabel("accuracy %")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)
