"""Domain adaptation from few shots, one run (`vlkit adapt`): a domain adapter against zero-shot, linear probe and
full fine-tuning, with the general-domain (photo) score measured with the adapter off (verified unchanged) and on.
The few-shot protocol (methods x shot counts x seeds) is `vlkit.train.fewshot`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from ..adapters.model import AdaptedModel
from ..data.api import load_data
from ..data.kinds import kind_domains
from ..data.pipeline import materialize
from ..errors import ConfigError
from ..outputs import OutputTarget
from .baselines import write_run_metrics
from .crossdomain import CrossDomain, domain_targets
from .engine import run
from .evaluate import round_percent
from .jobs import build_task
from .recipe import as_recipe, load_recipe
from .retention import gated_adapter

DATA_KIND = "world"  # the dataset kind adapt trains and evaluates on; its registry entry declares the domains
GENERAL_DOMAIN = "photo"

# the methods an adapter is compared with: `vlkit adapt`'s baselines, the few-shot protocol's base methods
BASE_METHODS = ("zeroshot", "linear", "linear-sgd", "full")
METHOD_LABELS = {
    "zeroshot": "zero-shot",
    "linear": "linear probe (L-BFGS)",
    "linear-sgd": "linear head (SGD)",
    "full": "full fine-tuning",
}
DEFAULT_LR = {"adapter": 2e-3, "full": 1e-4, "linear": 1e-2, "linear-sgd": 1e-2}


def world_train_spec(domain: str, shots: int, seed: int) -> dict[str, Any]:
    """The embedded world's classification draw for `domain` that k-shot training samples from."""
    return {
        "kind": DATA_KIND,
        "domain": domain,
        "task": "classification",
        "n": max(400, shots * 40),
        "seed": seed,
        "shots": shots,
    }


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
    train = world_train_spec(domain, shots, seed)
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
