"""Domain adaptation from few shots: a domain adapter against zero-shot, linear probe and full fine-tuning,
with the general-domain (photo) score measured with the adapter off (verified unchanged) and on.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, cast

import torch

from vlkit.backbones.loading import load_backbone

from ..adapters.model import AdaptedModel
from ..adapters.tip_adapter import build_tip_adapter
from ..data.api import few_shot, load_data, parse_data_spec
from ..data.kinds import kind_domains
from ..data.pipeline import materialize
from ..data.shots import kind_draws_shots
from ..errors import ConfigError, DataError
from ..outputs import OutputTarget
from ..plugins import registry
from .engine import run
from .jobs import build_task, load_datasets
from .recipe import load_recipe

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
              progress: Any = True, overwrite: bool = False) -> dict[str, Any]:
    """Few-shot adaptation into `out` (written whole, `vlkit.outputs`: a non-empty one needs `overwrite`)."""

    with OutputTarget(out, overwrite=overwrite, what="adapt output directory") as target:
        result = _run_adapt(backbone, domain, shots, target.staging, variant, baselines, steps, seed, n_eval,
                            adapter_options, progress)
    result["adapter_dir"] = str(out)
    return result


def _run_adapt(backbone, domain, shots, out, variant, baselines, steps, seed, n_eval, adapter_options,
               progress) -> dict[str, Any]:

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
    AdaptedModel.of(ad_backbone).disable_adapters()
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


# --- the few-shot protocol: methods x shot counts x seeds ---------------------------------------------------------

BASE_METHODS = ("zeroshot", "linear", "full")
TRAINING_FREE = ("tip-adapter",)
METHOD_LABELS = {"zeroshot": "zero-shot", "linear": "linear probe", "full": "full fine-tuning"}


def check_methods(methods) -> list[str]:
    """The methods of a protocol run: zeroshot, linear, full, tip-adapter or any registered adapter variant."""

    reg = registry("adapter")
    methods = [m.strip() for m in methods if m and m.strip()]
    if not methods:
        raise ConfigError("--method names no method")
    for m in methods:
        if m not in BASE_METHODS and m not in reg:
            raise ConfigError(f"unknown method {m!r}; methods: {', '.join(BASE_METHODS)} or an adapter variant "
                              f"({', '.join(reg.names())})")
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
        train = {"kind": DATA_KIND, "domain": domain, "task": "classification", "n": max(400, shots * 40),
                 "seed": seed, "shots": shots}
        return train, {"kind": DATA_KIND, "domain": domain, "task": "classification", "n": n_eval,
                       "seed": seed + 10_000}

    spec = parse_data_spec(data)
    spec.pop("split", None)
    return {**spec, "split": "train", "shots": shots}, {**spec, "split": "test"}


def method_recipe(backbone: str, method: str, train: dict, eval_: dict, steps: int, seed: int, shots: int,
                  adapter_options: dict | None = None, lr: float | None = None) -> dict:
    """The recipe of one protocol run. Adapter variants classify with the text head (class-name prompts through
    the possibly adapted text tower, as the CLIP-adaptation papers do); linear probe and full fine-tuning train
    a linear head initialised from those prompts."""

    is_variant = method not in BASE_METHODS
    kind = "adapter" if is_variant else method
    default_lr = {"adapter": 2e-3, "full": 1e-4, "linear": 1e-2}.get(kind, 1e-3)
    training_free = is_variant and getattr(registry("adapter").get(method), "training_free", False)
    return {
        "name": f"fewshot-{method}",
        "backbone": backbone,
        "method": kind,
        "adapter": {"variant": method if is_variant else "bottleneck", **(adapter_options or {})},
        "task": {"name": "classification", "options": {"head": "linear"} if kind in ("linear", "full") else {}},
        "data": {"train": train, "eval": eval_},
        "optim": {"lr": lr or default_lr, "steps": 0 if training_free or kind == "zeroshot" else steps,
                  "batch_size": min(32, max(1, shots) * 4), "warmup_steps": 0, "schedule": "cosine"},
        "eval": {"every_steps": 0},
        "checkpoint": {"every_steps": 0},
        "seed": seed,
        "logging": {"tensorboard": False},
    }


def protocol_val(cfg, shots: int, seed: int):
    """CoOp's few-shot validation set: min(shots, 4) examples per class (fewer where the split has fewer), from
    the source's val split (a world source: a fresh draw with its own seed). None where the source has no val
    split or a class has no val example."""
    from omegaconf import OmegaConf


    spec = cast(dict, OmegaConf.to_container(cfg.data.train, resolve=True))
    if kind_draws_shots(spec):
        spec.pop("seed", None)  # the seed of its own draw: the val draw below has its own
    spec.pop("shots", None)
    spec.setdefault("task", cfg.task.name)
    if spec.get("kind") == DATA_KIND:
        spec["seed"] = seed + 20_000
    else:
        spec["split"] = "val"
    try:
        ds = load_data(spec)
    except DataError:
        return None
    from collections import Counter

    counts = Counter(ds["label"])
    classes = len(ds.features["label"].names) if hasattr(ds.features["label"], "names") else len(counts)
    k = min(shots, 4, min(counts.values(), default=0))
    if k < 1 or len(counts) < classes:  # a class missing from the val split: no search (the paper's defaults)
        return None
    return few_shot(ds, k, seed=seed)


def _run_training_free(cfg, method: str, out: Path, shots: int) -> dict[str, Any]:
    """Tip-Adapter: the cache built from the few-shot set with no training (`build_tip_adapter`), α and β
    searched on the few-shot validation set (`protocol_val`), then evaluated on the test set."""

    bb = load_backbone(cfg.backbone)
    train_ds, eval_ds = load_datasets(cfg)
    task = build_task(bb, cfg, train_ds)
    val = protocol_val(cfg, shots, int(cfg.seed))
    record = build_tip_adapter(bb, train_ds, task=task, name="tip", variant=method, val=val)
    with torch.no_grad():
        metrics = task.evaluate(bb, task.prepare(bb, eval_ds))
    AdaptedModel.of(bb).save_adapter(out, name="tip", task=record.task)
    return {"score": metrics[task.metric], "parameters": {"trainable": 0},  # a cache of buffers: nothing trains
            "alpha": record.config["alpha"], "beta": record.config["beta"]}


def run_fewshot(backbone: str = "tiny", methods=("bottleneck",), shots=(1, 2, 4, 8, 16), seeds=(1, 2, 3), *,
                data: str | None = None, domain: str = "medical", out: str | Path | None = None,
                steps: int | None = None, n_eval: int = 400, adapter_options: dict | None = None,
                lr: float | None = None, progress=None, overwrite: bool = False, plot: bool = True,
                on_run=None) -> dict[str, Any]:
    """CoOp's few-shot protocol: every method at every shot count over every seed; accuracy mean ± sd per
    (method, shots), trainable parameters and training seconds per run. `data` is a data spec with train and
    test splits (e.g. `coop:DATA/eurosat`); default the embedded world's `domain`. With `out`, each run's
    files go under `out/<method>/<shots>shot-seed<seed>/` and the table (fewshot.json) and plot (fewshot.png)
    beside them (written whole, `vlkit.outputs`)."""

    methods = check_methods(methods)
    shots, seeds = list(shots), list(seeds)
    if data is None:

        domains = kind_domains(DATA_KIND) or ()
        if domain not in domains:
            raise ConfigError(f"unknown domain {domain!r}; known: {', '.join(domains)}")
    if out is None:
        import tempfile

        with tempfile.TemporaryDirectory(prefix="vlkit-fewshot-") as tmp:
            return _run_fewshot(backbone, methods, shots, seeds, data, domain, Path(tmp), steps, n_eval,
                                adapter_options, lr, progress, False, on_run)
    with OutputTarget(out, overwrite=overwrite, what="adapt output directory") as target:
        result = _run_fewshot(backbone, methods, shots, seeds, data, domain, target.staging, steps, n_eval,
                              adapter_options, lr, progress, plot, on_run)
    result["out"] = str(out)
    return result


def _run_fewshot(backbone, methods, shots, seeds, data, domain, out: Path, steps, n_eval, adapter_options, lr,
                 progress, plot, on_run) -> dict[str, Any]:
    import json
    import statistics
    import time


    runs: list[dict[str, Any]] = []
    for method in methods:
        for k in shots:
            for seed in seeds:
                train, eval_ = _protocol_data(data, domain, k, seed, n_eval)
                n_steps = steps or max(60, 6 * k)
                cfg = load_recipe(None, base=method_recipe(backbone, method, train, eval_, n_steps, seed, k,
                                                           adapter_options, lr),
                                  allow_untrained=method in TRAINING_FREE)
                where = out / method / f"{k}shot-seed{seed}"
                t0 = time.perf_counter()
                if method in TRAINING_FREE:
                    res = _run_training_free(cfg, method, where, k)
                else:
                    res, _, _ = run(cfg, where, progress=progress, publish=False)
                seconds = time.perf_counter() - t0
                row: dict[str, Any] = {"method": method, "shots": k, "seed": seed, "accuracy": float(res["score"]),
                       "trainable": int(res.get("parameters", {}).get("trainable", 0)), "seconds": seconds,
                       "steps": 0 if method in TRAINING_FREE or method == "zeroshot" else n_steps,
                       **{h: res[h] for h in ("alpha", "beta") if h in res}}
                runs.append(row)
                if on_run is not None:
                    on_run(row)
    summary: list[dict[str, Any]] = []
    for method in methods:
        for k in shots:
            rs = [r for r in runs if r["method"] == method and r["shots"] == k]
            accs = [r["accuracy"] for r in rs]
            summary.append({"method": method, "shots": k, "mean": statistics.fmean(accs),
                            "sd": statistics.stdev(accs) if len(accs) > 1 else 0.0, "seeds": len(accs),
                            "trainable": rs[0]["trainable"], "seconds": statistics.fmean(r["seconds"] for r in rs)})
    result = {"backbone": backbone, "data": data or f"{DATA_KIND}:{domain}", "methods": methods, "shots": shots,
              "seeds": seeds, "metric": "accuracy", "summary": summary, "runs": runs}
    (out / "fewshot.json").write_text(json.dumps(result, indent=2) + "\n")
    if plot:
        plot_fewshot(summary, out / "fewshot.png", title=f"{result['data']} ({backbone}), mean ± sd over "
                                                          f"{len(seeds)} seed(s)")
        result["plot"] = str(out / "fewshot.png")
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
        line, = ax.plot(xs, ys, marker="os^D"[i % 4], color=colors[i % len(colors)],
                        linestyle="-" if i % 2 == 0 else "--", label=METHOD_LABELS.get(method, method))
        ax.fill_between(xs, [y - s for y, s in zip(ys, sd)], [y + s for y, s in zip(ys, sd)], alpha=0.15,
                        color=line.get_color())
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
