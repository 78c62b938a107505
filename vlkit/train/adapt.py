"""Domain adaptation from few shots: a domain adapter against zero-shot, linear probe and full fine-tuning,
with the general-domain (photo) score measured with the adapter off (verified unchanged) and on.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError

DATA_KIND = "world"  # the dataset kind adapt trains and evaluates on; its registry entry declares the domains
GENERAL_DOMAIN = "photo"


def adapt_recipe(backbone: str, domain: str, shots: int, method: str, variant: str, steps: int, seed: int,
                 n_eval: int, adapter_options: dict[str, Any] | None = None, lr: float | None = None) -> dict:
    default_lr = {"adapter": 2e-3, "full": 1e-4, "linear": 1e-2}.get(method, 1e-3)
    train = {"kind": DATA_KIND, "domain": domain, "task": "classification", "n": max(400, shots * 40),
             "seed": seed, "shots": shots}
    return {
        "name": f"{domain}-{method}",
        "backbone": backbone,
        "method": method,
        "adapter": {"variant": variant, **(adapter_options or {})},
        "task": {"name": "classification", "options": {} if method == "zeroshot" else {"head": "linear"}},
        "data": {"train": train,
                 "eval": {"kind": DATA_KIND, "domain": domain, "task": "classification", "n": n_eval,
                          "seed": seed + 10_000}},
        "optim": {"lr": lr or default_lr, "steps": steps, "batch_size": min(32, shots * 4), "warmup_steps": 0,
                  "schedule": "cosine"},
        "seed": seed,
        "logging": {"tensorboard": False},
    }


def _general_eval(backbone, cfg, n_eval: int, seed: int):
    """Photo-domain zero-shot classification accuracy (class prompts through the text tower) and the
    logits, to verify that 'adapter off' is exactly the frozen model."""
    from omegaconf import OmegaConf

    from ..data import load_data
    from ..data.pipeline import materialize
    from .engine import build_task

    ds = load_data({"kind": DATA_KIND, "domain": GENERAL_DOMAIN, "task": "classification", "n": n_eval,
                    "seed": seed + 20_000})
    cfg = OmegaConf.merge(cfg, {"method": "zeroshot"})
    OmegaConf.update(cfg, "task.options", {}, merge=False)
    task = build_task(backbone, cfg, ds)
    data = task.prepare(backbone, ds)
    with torch.no_grad():
        metrics = task.evaluate(backbone, data)
        logits = task.logits(backbone, materialize(data)["pixels"])
    return metrics[task.metric], logits


def run_adapt(backbone: str = "tiny", domain: str = "medical", shots: int = 16, out: str | Path = "runs/adapt",
              variant: str = "bottleneck", baselines: tuple[str, ...] = (), steps: int | None = None,
              seed: int = 0, n_eval: int = 400, adapter_options: dict | None = None,
              progress: bool = True, overwrite: bool = False) -> dict[str, Any]:
    """Few-shot adaptation into `out` (written whole, `vlkit.outputs`: a non-empty one needs `overwrite`)."""
    from ..outputs import OutputTarget

    with OutputTarget(out, overwrite=overwrite, what="adapt output directory") as target:
        result = _run_adapt(backbone, domain, shots, target.staging, variant, baselines, steps, seed, n_eval,
                            adapter_options, progress)
    result["adapter_dir"] = str(out)
    return result


def _run_adapt(backbone, domain, shots, out, variant, baselines, steps, seed, n_eval, adapter_options,
               progress) -> dict[str, Any]:
    from ..data.kinds import kind_domains
    from .engine import run
    from .recipe import load_recipe

    domains = kind_domains(DATA_KIND) or ()
    if domain not in domains:
        raise ConfigError(f"unknown domain {domain!r}; known: {', '.join(domains)}")
    if domain == GENERAL_DOMAIN:
        raise ConfigError(f"{GENERAL_DOMAIN!r} is the general (pre-training) domain; adapt to another one")
    for b in baselines:
        if b not in ("full", "linear"):
            raise ConfigError(f"unknown baseline {b!r}; choose from full, linear")
    out = Path(out)
    steps = steps or max(60, 6 * shots)
    rows: list[dict[str, Any]] = []

    def cfg_for(method: str):
        return load_recipe(None, base=adapt_recipe(backbone, domain, shots, method, variant, steps, seed, n_eval,
                                                   adapter_options))

    zs_cfg = cfg_for("zeroshot")
    zs, zs_backbone, _ = run(zs_cfg, out / "zeroshot", progress=False, publish=False)
    photo_frozen, photo_frozen_logits = _general_eval(zs_backbone, zs_cfg, n_eval, seed)
    rows.append({"method": "zero-shot (frozen)", "trainable_percent": 0.0, "in_domain": zs["score"],
                 "general": photo_frozen, "general_change": 0.0})

    ad_cfg = cfg_for("adapter")
    ad, ad_backbone, _ = run(ad_cfg, out, progress=progress, publish=False)
    photo_on, _ = _general_eval(ad_backbone, ad_cfg, n_eval, seed)
    ad_backbone.set_active()
    photo_off, photo_off_logits = _general_eval(ad_backbone, ad_cfg, n_eval, seed)
    verified = (photo_off == photo_frozen and photo_off_logits is not None
                and torch.equal(photo_off_logits, photo_frozen_logits))
    rows.append({"method": f"{variant} adapter, off", "trainable_percent": 0.0, "in_domain": None,
                 "general": photo_off, "general_change": photo_off - photo_frozen, "verified_unchanged": verified})
    rows.append({"method": f"{variant} adapter, on", "trainable_percent": ad["parameters"]["trainable_percent"],
                 "in_domain": ad["score"], "general": photo_on, "general_change": photo_on - photo_frozen})
    for method in baselines:
        bcfg = cfg_for(method)
        res, bb, _ = run(bcfg, out / f"baseline-{method}", progress=progress, publish=False)
        row = {"method": "full fine-tuning" if method == "full" else "linear probe",
               "trainable_percent": res["parameters"]["trainable_percent"], "in_domain": res["score"]}
        if method == "full":
            photo_after, _ = _general_eval(bb, bcfg, n_eval, seed)
            row.update(general=photo_after, general_change=photo_after - photo_frozen,
                       forgetting=photo_frozen - photo_after)
        else:
            row.update(general=photo_frozen, general_change=0.0)
        rows.append(row)
    return {"backbone": backbone, "domain": domain, "shots": shots, "variant": variant, "steps": steps,
            "metric": "accuracy", "general_domain": GENERAL_DOMAIN, "adapter_dir": str(out),
            "adapter_off_verified": verified, "rows": rows}
