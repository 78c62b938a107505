"""`vlkit adapt` on a generative backbone, VL-Adapter's way: an adapter in the language model trained on a few
examples of a generative task (captioning, open-ended VQA, ...) in a target domain, through the one engine.

What it reports is what `vlkit.train.adapt` reports for a dual encoder, with the task's own metric (CIDEr-D and
BLEU-4 for captioning, accuracy for the others):

- in-domain: the frozen backbone and the adapted one on held-out target-domain data;
- general (retention): both on the general (photo) domain for the same task, the adapter also switched off
  (verified to generate exactly the frozen model's text), retention the adapted score as a percentage of the
  frozen one.

`shots` means the number of training examples in total (a generative task has no classes to count per). The
task is `--task`, any registered task whose `backbone_kind` is the backbone's, by default the one that declares
`adapt_default`. Methods: adapter variants (in the language model's towers unless `towers` is given), `full`
and `zeroshot` (the frozen model); a method or variant whose `backbone_kinds` leaves generative backbones out
(the linear probes, Tip-Adapter, CoOp, ...) is refused in one line. Several methods, shot counts or seeds run
the few-shot protocol (`run_fewshot_generative`): mean ± sd of the metric per (method, shots).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..adapters.model import AdaptedModel
from ..backbones.loading import load_backbone
from ..data.api import load_data, parse_data_spec
from ..data.kinds import kind_domains, kind_meta
from ..errors import ConfigError
from ..io import write_json
from ..outputs import OutputTarget
from ..plugins import registry
from .adapt import BASE_METHODS, DATA_KIND, DEFAULT_LR, GENERAL_DOMAIN, METHOD_LABELS
from .baselines import write_run_metrics
from .engine import run
from .evaluate import round_percent
from .fewshot import summarize
from .methods import get_method
from .recipe import Recipe, load_recipe, plain

GENERATIVE = "generative"
DEFAULT_EVAL = 200  # held-out examples per evaluation set (generation is slower than a dual encoder's logits)
EVAL_BATCH = 64
DEFAULT_VARIANT = Recipe().adapter["variant"]  # the recipe's default adapter variant


def tasks_for(kind: str) -> list[str]:
    """The registered tasks that run on a backbone of `kind` (their `backbone_kind`)."""
    return [e.name for e in registry("task") if getattr(e.obj, "backbone_kind", "contrastive") == kind]


def resolve_task(backbone, task: str | None) -> str:
    """`task`, checked against the backbone's kind, or the task of that kind that declares `adapt_default`."""
    kind = backbone.kind
    fits = tasks_for(kind)
    if task is None:
        for name in fits:
            if getattr(registry("task").get(name), "adapt_default", False):
                return name
        if not fits:
            raise ConfigError(f"no registered task runs on a {kind} backbone such as {backbone.spec}")
        return fits[0]
    cls = registry("task").get(task)
    if getattr(cls, "backbone_kind", "contrastive") != kind:
        raise ConfigError(
            f"task {task!r} runs on {cls.backbone_kind} backbones and {backbone.spec} is a {kind} one; "
            f"--task for it: {', '.join(fits)}"
        )
    return task


def check_dual_encoder_task(backbone, task: str | None) -> None:
    """`--task` on a dual encoder: only the task of its kind that declares `adapt_default` (what the classification
    adaptation of `vlkit.train.adapt` runs); another is a ConfigError in one line."""
    if task is None:
        return
    default = resolve_task(backbone, None)
    if resolve_task(backbone, task) != default:
        raise ConfigError(
            f"`vlkit adapt` adapts a dual encoder such as {backbone.spec} with task {default!r}; "
            f"train {task!r} with `vlkit train`"
        )


def check_methods_for(backbone, methods) -> list[str]:
    """The protocol's methods on this backbone: adapter variants and the base methods whose declared
    `backbone_kinds` include its kind; any other is a ConfigError in one line."""
    kind, spec = backbone.kind, backbone.spec
    reg = registry("adapter")
    fits = [n for n in reg.names() if kind in reg.get(n).backbone_kinds]
    base = [m for m in BASE_METHODS if kind in get_method(m).backbone_kinds]
    names = [m.strip() for m in methods if m and m.strip()]
    if not names:
        raise ConfigError("--method names no method")
    for m in names:
        if m in reg:
            kinds = reg.get(m).backbone_kinds
        elif m in BASE_METHODS:
            kinds = get_method(m).backbone_kinds
        else:
            raise ConfigError(f"unknown method {m!r}; on {spec}: {', '.join(base)} or a variant ({', '.join(fits)})")
        if kind not in kinds:
            raise ConfigError(
                f"method {m!r} works on {' and '.join(kinds)} backbones and {spec} is a {kind} one; "
                f"on it: {', '.join(base)} or a variant ({', '.join(fits)})"
            )
    return names


@dataclass
class GenerativeAdapt:
    """What every run of one generative adaptation shares: the backbone, task, data and optimiser settings."""

    backbone: str
    task: str
    domain: str
    data: str | None = None
    general: Any = None
    n_eval: int = DEFAULT_EVAL
    steps: int | None = None
    lr: float | None = None
    batch_size: int | None = None
    adapter_options: dict = field(default_factory=dict)
    task_options: dict = field(default_factory=dict)
    progress: Any = None
    towers_alias: str | None = None  # the backbone's name for its language-model towers (`lm`), if it has one

    def check(self) -> None:
        if self.data is None:
            domains = kind_domains(DATA_KIND) or ()
            if self.domain not in domains:
                raise ConfigError(f"unknown domain {self.domain!r}; known: {', '.join(domains)}")
            if self.domain == GENERAL_DOMAIN:
                raise ConfigError(f"{GENERAL_DOMAIN!r} is the general (pre-training) domain; adapt to another one")
            known = kind_meta(DATA_KIND).get("tasks") or ()
            if self.task not in known:
                raise ConfigError(f"the embedded world has no {self.task!r} data; give --data with its train and test")
        for name, value in (("--batch-size", self.batch_size), ("--steps", self.steps)):
            if value is not None and value < 1:
                raise ConfigError(f"{name} must be at least 1, got {value}")
        if self.lr is not None and not self.lr > 0:
            raise ConfigError(f"--lr must be a positive number, got {self.lr}")
        if self.n_eval < 1:
            raise ConfigError(f"n_eval must be at least 1, got {self.n_eval}")

    # --- data ---------------------------------------------------------------------------------------------
    def world(self, domain: str, n: int, seed: int) -> dict[str, Any]:
        return {"kind": DATA_KIND, "domain": domain, "task": self.task, "n": n, "seed": seed}

    def train_spec(self, shots: int, seed: int) -> dict[str, Any]:
        if self.data is None:
            return self.world(self.domain, shots, seed)
        spec = parse_data_spec(self.data)
        spec.pop("split", None)
        return {**spec, "task": self.task, "split": "train"}

    def eval_spec(self, seed: int) -> dict[str, Any]:
        if self.data is None:
            return self.world(self.domain, self.n_eval, seed + 10_000)
        spec = parse_data_spec(self.data)
        spec.pop("split", None)
        return {**spec, "task": self.task, "split": "test"}

    def general_spec(self, seed: int) -> dict[str, Any] | None:
        """The general domain's data: `general` as given, else for the world its photo domain, else none."""
        if self.general is not None:
            return {**parse_data_spec(self.general), "task": self.task}
        return None if self.data is not None else self.world(GENERAL_DOMAIN, self.n_eval, seed + 20_000)

    def train_data(self, shots: int, seed: int):
        """`shots` training examples: drawn by the world, or a seeded sample of the data's train split."""
        ds = load_data(self.train_spec(shots, seed))
        if self.data is None:
            return ds
        if shots > len(ds):
            raise ConfigError(f"--shots {shots}: the train split of {self.data} has {len(ds)} examples")
        order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed)).tolist()
        return ds.select(sorted(order[:shots]))

    # --- runs ---------------------------------------------------------------------------------------------
    def recipe(self, method: str, shots: int, seed: int):
        """The engine's recipe of one run: method `full` or `zeroshot`, or an adapter variant."""
        variant = method not in BASE_METHODS
        kind = "adapter" if variant else method
        adapter = {"variant": method, **self.adapter_options} if variant else {}
        if variant and self.towers_alias and "towers" not in adapter:
            if hasattr(registry("adapter").get(method).make_config(), "towers"):
                adapter["towers"] = self.towers_alias  # VL-Adapter: the adapters go in the language model
        training_free = variant and getattr(registry("adapter").get(method), "training_free", False)
        steps = 0 if training_free or kind == "zeroshot" else (self.steps or max(60, 2 * shots))
        base = {
            "name": f"{self.domain if self.data is None else 'data'}-{method}",
            "backbone": self.backbone,
            "method": kind,
            **({"adapter": adapter} if adapter else {}),
            "task": {"name": self.task, "options": dict(self.task_options)},
            "data": {"train": self.train_spec(shots, seed), "eval": self.eval_spec(seed)},
            "optim": {
                "lr": self.lr or DEFAULT_LR.get(kind, 1e-3),
                "steps": steps,
                "batch_size": self.batch_size or min(16, max(1, shots)),
                "warmup_steps": 0,
                "schedule": "cosine",
            },
            "eval": {"every_steps": 0, "batch_size": EVAL_BATCH},
            "checkpoint": {"every_steps": 0},
            "seed": seed,
            "logging": {"tensorboard": False},
        }
        return load_recipe(None, base=base, allow_untrained=steps == 0)

    def train(self, method: str, shots: int, seed: int, where: Path, eval_ds):
        """One run through the engine into `where`: (its result, the trained backbone, the recipe)."""
        cfg = self.recipe(method, shots, seed)
        res, bb, _ = run(
            cfg, where, progress=self.progress, publish=False, datasets=(self.train_data(shots, seed), eval_ds)
        )
        return res, bb, cfg

    def score(self, backbone, ds, train_ds=None) -> tuple[dict[str, float], list[str] | None]:
        """The task's metrics of `backbone` on `ds` and, where the task generates, the text it generated."""
        task = registry("task").get(self.task)(backbone, train_ds if train_ds is not None else ds, **self.task_options)
        data = task.prepare(backbone, ds)
        with torch.no_grad():
            if hasattr(task, "generate") and hasattr(task, "score"):
                texts = task.generate(backbone, data, EVAL_BATCH)
                return task.score(texts, data["references"].tolist()), texts
            return task.evaluate(backbone, data, EVAL_BATCH), None

    def metric(self) -> str:
        return registry("task").get(self.task).metric


def load_generative(spec: str):
    """The backbone of `spec` when it is a generative one (frozen, loaded once for the frozen scores), else None."""
    bb = load_backbone(spec)
    return bb if getattr(bb, "kind", None) == GENERATIVE else None


def _setting(backbone: str, frozen, task: str | None, **settings: Any) -> tuple[GenerativeAdapt, Any]:
    """The run's settings, checked, and the frozen backbone (`frozen`, or loaded from `backbone`)."""
    frozen = frozen if frozen is not None else load_backbone(backbone)
    if getattr(frozen, "kind", None) != GENERATIVE:
        raise ConfigError(f"{backbone} is not a generative backbone; `vlkit adapt` adapts it with its own tasks")
    alias = "lm" if "lm" in (*frozen.tower_aliases, *frozen.towers) else None
    s = GenerativeAdapt(backbone, resolve_task(frozen, task), towers_alias=alias, **settings)
    s.check()
    return s, frozen


def run_adapt_generative(
    backbone: str = "tiny-vl",
    task: str | None = None,
    domain: str = "medical",
    shots: int = 16,
    out: str | Path = "runs/adapt",
    variant: str = DEFAULT_VARIANT,
    baselines: tuple[str, ...] = (),
    steps: int | None = None,
    seed: int = 0,
    n_eval: int | None = None,
    adapter_options: dict | None = None,
    progress: Any = True,
    overwrite: bool = False,
    lr: float | None = None,
    batch_size: int | None = None,
    task_options: dict | None = None,
    frozen=None,
) -> dict[str, Any]:
    """Adapt a generative backbone to world `domain` from `shots` training examples of `task` into `out` (the
    adapter directory, written whole; a non-empty one needs `overwrite`). Rows: the frozen backbone, the adapter
    off (verified to generate the frozen text) and on, then `baselines` (`full`), each with its in-domain and
    general-domain score and retention, on `n_eval` held-out examples each (default `DEFAULT_EVAL`). `frozen`:
    the backbone already loaded (else loaded from `backbone`)."""
    s, frozen = _setting(
        backbone,
        frozen,
        task,
        domain=domain,
        n_eval=DEFAULT_EVAL if n_eval is None else n_eval,
        steps=steps,
        lr=lr,
        batch_size=batch_size,
        adapter_options=dict(adapter_options or {}),
        task_options=dict(task_options or {}),
        progress=progress,
    )
    if shots < 1:
        raise ConfigError(f"--shots must be at least 1 (training examples), got {shots}")
    if variant not in registry("adapter"):
        raise ConfigError(f"unknown adapter variant {variant!r}; known: {', '.join(registry('adapter').names())}")
    for b in baselines:
        if b not in BASE_METHODS:
            raise ConfigError(f"unknown baseline {b!r}; choose from {', '.join(BASE_METHODS)}")
    check_methods_for(frozen, [variant, *baselines])
    with OutputTarget(out, overwrite=overwrite, what="adapt output directory") as target:
        result = _single(s, frozen, shots, target.staging, variant, [b for b in baselines if b != "zeroshot"], seed)
        on = result["rows"][2]
        write_run_metrics(
            target.staging,
            Path(out),
            {
                "hyperparameters": result["hyperparameters"],
                "shots_mean": "training examples",
                "in_domain_frozen": result["rows"][0]["in_domain"],
                "general_domain": GENERAL_DOMAIN,
                "general": on["general"],
                "general_frozen": result["rows"][0]["general"],
                "general_metrics": on["general_metrics"],
                "retention": on["retention"],
            },
        )
    result["adapter_dir"] = str(out)
    return round_percent(result)


def _row(method: str, trainable: float, in_domain: dict | None, general: dict, frozen: dict, metric: str) -> dict:
    return {
        "method": method,
        "trainable_percent": trainable,
        "in_domain": None if in_domain is None else in_domain[metric],
        "in_domain_metrics": in_domain,
        "general": general[metric],
        "general_metrics": general,
        "general_change": general[metric] - frozen[metric],
        "retention": 100.0 * general[metric] / frozen[metric] if frozen[metric] else None,
    }


def _single(s: GenerativeAdapt, frozen, shots: int, out: Path, variant: str, baselines, seed: int) -> dict[str, Any]:
    metric = s.metric()
    eval_ds = load_data(s.eval_spec(seed))
    gen_ds = load_data(s.general_spec(seed))
    in_frozen, _ = s.score(frozen, eval_ds)
    gen_frozen, texts_frozen = s.score(frozen, gen_ds)
    rows = [_row("frozen (zero-shot)", 0.0, in_frozen, gen_frozen, gen_frozen, metric)]

    ad, ad_bb, cfg = s.train(variant, shots, seed, out, eval_ds)
    gen_on, _ = s.score(ad_bb, gen_ds)
    AdaptedModel.of(ad_bb).disable_adapters()
    gen_off, texts_off = s.score(ad_bb, gen_ds)
    verified = gen_off == gen_frozen and texts_off == texts_frozen
    rows.append(
        {**_row(f"{variant} adapter, off", 0.0, None, gen_off, gen_frozen, metric), "verified_unchanged": verified}
    )
    rows.append(
        _row(f"{variant} adapter, on", ad["parameters"]["trainable_percent"], ad["metrics"], gen_on, gen_frozen, metric)
    )
    for method in baselines:
        res, bb, _ = s.train(method, shots, seed, out / f"baseline-{method}", eval_ds)
        gen, _ = s.score(bb, gen_ds)
        row = _row(
            METHOD_LABELS.get(method, method),
            res["parameters"]["trainable_percent"],
            res["metrics"],
            gen,
            gen_frozen,
            metric,
        )
        rows.append({**row, "forgetting": gen_frozen[metric] - gen[metric]})
    return {
        "backbone": s.backbone,
        "backbone_kind": GENERATIVE,
        "task": s.task,
        "domain": s.domain,
        "shots": shots,
        "shots_mean": "training examples",
        "variant": variant,
        "adapter": plain(cfg.adapter),
        "steps": int(cfg.optim.steps),
        "hyperparameters": {
            "lr": float(cfg.optim.lr),
            "steps": int(cfg.optim.steps),
            "batch_size": int(cfg.optim.batch_size),
            **s.task_options,
        },
        "metric": metric,
        "metrics": sorted(in_frozen),
        "n_eval": s.n_eval,
        "general_domain": GENERAL_DOMAIN,
        "adapter_dir": str(out),
        "adapter_off_verified": verified,
        "rows": rows,
    }


# --- the few-shot protocol: methods x shot counts x seeds ---------------------------------------------------------


def run_fewshot_generative(
    backbone: str = "tiny-vl",
    methods=(DEFAULT_VARIANT,),
    shots=(16, 64),
    seeds=(1, 2, 3),
    *,
    task: str | None = None,
    data: str | None = None,
    domain: str = "medical",
    out: str | Path | None = None,
    steps: int | None = None,
    n_eval: int | None = None,
    adapter_options: dict | None = None,
    lr: float | None = None,
    batch_size: int | None = None,
    task_options: dict | None = None,
    general: Any = None,
    progress=None,
    overwrite: bool = False,
    on_run=None,
    frozen=None,
) -> dict[str, Any]:
    """The few-shot protocol on a generative backbone: every method at every shot count (training examples in
    total) over every seed; the task's metric mean ± sd per (method, shots) on the held-out target data (the
    world's `domain`, or `data`'s test split with `shots` drawn from its train split), and each run's
    general-domain score and retention (`general`, a data spec; default the world's photo domain without
    `data`). With `out`, each run's files go under `out/<method>/<shots>shot-seed<seed>/` and the table
    (fewshot.json) beside them."""
    s, frozen = _setting(
        backbone,
        frozen,
        task,
        domain=domain,
        data=data,
        general=general,
        n_eval=DEFAULT_EVAL if n_eval is None else n_eval,
        steps=steps,
        lr=lr,
        batch_size=batch_size,
        adapter_options=dict(adapter_options or {}),
        task_options=dict(task_options or {}),
        progress=progress,
    )
    methods = check_methods_for(frozen, methods)
    shots, seeds = list(shots), list(seeds)
    if not shots or not seeds or min(shots) < 1:
        raise ConfigError("--shots must be integers >= 1 (training examples) and --seeds must name a seed")
    if out is None:
        import tempfile

        with tempfile.TemporaryDirectory(prefix="vlkit-fewshot-") as tmp:
            return _protocol(s, frozen, methods, shots, seeds, Path(tmp), Path(tmp), on_run)
    with OutputTarget(out, overwrite=overwrite, what="adapt output directory") as target:
        result = _protocol(s, frozen, methods, shots, seeds, target.staging, Path(out), on_run)
    result["out"] = str(out)
    return result


def _protocol(s: GenerativeAdapt, frozen, methods, shots, seeds, out: Path, final: Path, on_run) -> dict[str, Any]:
    metric = s.metric()
    spec = s.general_spec(seeds[0])
    general = None
    if spec is not None:
        gen_ds = load_data(spec)
        general = (gen_ds, s.score(frozen, gen_ds)[0][metric])
    frozen_in: dict[int, dict] = {}  # the frozen scores per seed (its held-out set), whatever the shots
    runs: list[dict[str, Any]] = []
    for method in methods:
        for k in shots:
            for seed in seeds:
                rel = Path(method) / f"{k}shot-seed{seed}"
                row = _one_run(s, frozen, method, k, seed, (out / rel, final / rel), general, frozen_in)
                runs.append(row)
                if on_run is not None:
                    on_run(row)
    result = {
        "backbone": s.backbone,
        "backbone_kind": GENERATIVE,
        "task": s.task,
        "data": s.data or f"{DATA_KIND}:{s.domain}",
        "protocol": "fewshot",
        "methods": methods,
        "shots": shots,
        "shots_mean": "training examples",
        "seeds": seeds,
        "metric": metric,
        "summary": summarize(runs, methods, shots, metric="score", keys=("general", "retention")),
        "runs": runs,
    }
    if general is not None:
        result["general"] = {"data": s.general or f"{DATA_KIND}:{GENERAL_DOMAIN}", "frozen": general[1]}
    result = round_percent(result)
    write_json(out / "fewshot.json", result)
    return result


def _one_run(
    s: GenerativeAdapt, frozen, method: str, k: int, seed: int, where: tuple[Path, Path], general, frozen_in: dict
) -> dict[str, Any]:
    """One (method, shots, seed) run: trained (or the frozen model for `zeroshot`, its scores cached per seed),
    scored in-domain and on the general domain; writes its metrics.json and returns its row."""
    metric = s.metric()
    eval_ds = load_data(s.eval_spec(seed))
    t0 = time.perf_counter()
    hyper: dict[str, Any] = {"lr": None, "steps": 0, "batch_size": None}
    record: dict[str, Any] = {"protocol": "fewshot", "task": s.task, "shots": k, "seed": seed}
    if method == "zeroshot":
        if seed not in frozen_in:
            frozen_in[seed] = s.score(frozen, eval_ds)[0]
        res: dict[str, Any] = {"metrics": frozen_in[seed], "parameters": {"trainable": 0}}
        bb = frozen
        record.update(method=method, score=res["metrics"][metric], metrics=res["metrics"], parameters=res["parameters"])
    else:
        res, bb, cfg = s.train(method, k, seed, where[0], eval_ds)
        hyper = {"lr": float(cfg.optim.lr), "steps": int(cfg.optim.steps), "batch_size": int(cfg.optim.batch_size)}
    row: dict[str, Any] = {
        "method": method,
        "shots": k,
        "seed": seed,
        "score": float(res["metrics"][metric]),
        "metrics": res["metrics"],
        "trainable": int(res["parameters"].get("trainable", 0)),
        "seconds": time.perf_counter() - t0,
        "steps": hyper["steps"],
        "hyperparameters": hyper,
    }
    if general is not None:
        row["general"] = general[1] if bb is frozen else s.score(bb, general[0])[0][metric]
        row["retention"] = 100.0 * row["general"] / general[1] if general[1] else None
        record.update(general=row["general"], retention=row["retention"])
    write_run_metrics(where[0], where[1], {**record, "hyperparameters": hyper})
    return row
