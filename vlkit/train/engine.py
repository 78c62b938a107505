"""The training engine: one loop for single-task, multi-task and AdapterFusion training.

Accelerate handles devices, precision and data parallelism. Each task's prepared data streams through a
DataLoader (`vlkit.data.pipeline`): images are decoded and transformed on the fly in worker processes,
batches come from a seeded per-epoch permutation sharded across processes, and the sampler's position
follows from the step count, so a resumed run reads exactly the batches an uninterrupted run would have
seen, with any number of workers. A multi-task recipe trains one adapter per task round-robin: step s
runs task (s - 1) mod T with its adapter active, through the same loop, checkpoints and resume.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..adapters.report import parameter_counts as counts
from ..backbones.loading import load_backbone
from ..data.api import few_shot  # noqa: F401 (moved to the data layer)
from ..data.pipeline import (
    LazyImages,
    SeededBatches,
    build_augment,
    configure,
    make_loader,
    num_rows,
    stream_loader,
    take,
    with_train_augment,
)
from ..errors import ConfigError
from ..io import write_text
from ..outputs import OutputTarget
from ..tasks.features import CACHE, frozen_towers
from .checkpoint import CKPT_DIR, latest_checkpoint, load_checkpoint, save_checkpoint
from .compiling import compiled_step
from .jobs import Job, build_task, is_streaming, load_datasets, prepare_training  # noqa: F401 (library API)
from .logs import MetricsLog
from .methods import get_method
from .plan import build_plan, job_count
from .recipe import as_recipe, check_resumable, plain, to_yaml


class _TrainModule(nn.Module):
    """Backbone and task heads under one module so DDP and Accelerate see every trainable parameter."""

    _tasks: list[Any]

    def __init__(self, backbone, tasks):
        super().__init__()
        self.backbone = backbone
        self.heads = nn.ModuleList([t.head for t in tasks])
        object.__setattr__(self, "_tasks", list(tasks))

    def forward(self, batch, job: int = 0):
        return self._tasks[job].loss(self.backbone, batch)


SCHEDULERS = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine"}


def _scheduler(optimizer, kind: str, warmup: int, total: int):
    """The standard warmup schedules of `transformers.get_scheduler` (a LambdaLR, so checkpoints resume it)."""
    from transformers.optimization import get_scheduler

    return get_scheduler(SCHEDULERS[kind], optimizer, num_warmup_steps=warmup, num_training_steps=max(total, 1))


def _accelerator(cfg, find_unused: bool = False):
    from accelerate import Accelerator

    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' was asked for but no CUDA device is available (use device=auto or cpu)")
    mp = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[cfg.precision]
    if mp == "fp16" and not torch.cuda.is_available():
        raise ConfigError("precision fp16 needs a CUDA device; on CPU use bf16 or fp32")
    kwargs = []
    if find_unused:
        from accelerate.utils import DistributedDataParallelKwargs

        kwargs.append(DistributedDataParallelKwargs(find_unused_parameters=True))
    try:
        cpu = cfg.device == "cpu" or (cfg.device == "auto" and not torch.cuda.is_available())
        return Accelerator(cpu=cpu, mixed_precision=mp, kwargs_handlers=kwargs)
    except (ValueError, RuntimeError) as exc:
        raise ConfigError(f"cannot set up device {cfg.device!r} with precision {cfg.precision!r}: {exc}") from None


def steps_per_epoch(n: int, batch_size: int, grad_accum: int, world: int) -> int:
    per_proc = n // world if world > 1 else n
    return max(1, math.ceil(math.ceil(per_proc / batch_size) / grad_accum))


def train(
    cfg,
    out_dir: str | Path | None = None,
    *,
    resume: bool = False,
    overwrite: bool = False,
    progress=None,
    stop_after: int | None = None,
) -> dict[str, Any]:
    """Run a recipe. Returns the final metrics and where everything was written.

    The output directory follows `vlkit.outputs`: a non-empty one is refused unless `resume` (continue its
    checkpoints) or `overwrite`; the finished run replaces it whole. `progress`: a callable
    `progress(event, **info)` (events "start", "step", "end", "warning"), or None."""
    return run(cfg, out_dir, resume=resume, overwrite=overwrite, progress=progress, stop_after=stop_after)[0]


def recipe_inputs(cfg) -> list[str]:
    """Local paths a recipe reads (adapters it builds on, local data), which its output may not be."""
    found: list[str] = []

    def walk(node):
        if isinstance(node, dict):
            for k, v in node.items():
                if k in ("path", "source", "data_dir", "base", "dir") and isinstance(v, str) and "://" not in v:
                    found.append(v.split("+")[0])
                else:
                    walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(plain(cfg))
    return [p for p in found if p and Path(p).exists()]


def _main_process() -> bool:
    import os

    return os.environ.get("RANK", "0") == "0"


def _reporter(progress):
    if callable(progress):
        return progress
    return lambda event, **info: None


def configure_pipeline(cfg, *prepared) -> None:
    """Apply the recipe's DataLoader options (data.num_workers, data.pin_memory, data.prefetch_factor)."""
    opts = {
        "num_workers": cfg.data.num_workers,
        "pin_memory": cfg.data.pin_memory,
        "prefetch_factor": cfg.data.prefetch_factor,
    }
    for data in prepared:
        if is_streaming(data):
            data.loader_options.update(opts)
        else:
            configure(data, **opts)


def _train_view(cfg, backbone, data):
    return with_train_augment(data, build_augment(cfg.data.augment, backbone.image_size), cfg.seed)


def run(
    cfg,
    out_dir: str | Path | None = None,
    *,
    resume: bool = False,
    overwrite: bool = False,
    progress=None,
    stop_after: int | None = None,
    datasets: tuple | dict | None = None,
    publish: bool = True,
):
    """Like `train`, and also returns the trained backbone and task: (result, backbone, task).

    A recipe with `tasks` trains one adapter per task through the same loop; the third item is then a
    {adapter name: task} dict and `datasets` (optional) maps adapter names to (train, eval) datasets.

    While it trains, the output directory holds the run's working state (`checkpoints/` with the recipe they
    belong to, `metrics.jsonl`, `tensorboard/`); the final files are written into a staging directory that
    then replaces the output directory whole, the checkpoints carried over. `publish=False` (a run inside
    another command's staging directory, e.g. `vlkit adapt`) writes the final files into the output directory."""
    import shutil

    cfg = as_recipe(cfg)
    out = Path(out_dir or cfg.output_dir or f"runs/{cfg.name}")
    if publish and _main_process():
        holder = OutputTarget(out).holder()
        if holder is not None:
            raise ConfigError(f"run directory {out} is being written by another vlkit process (PID {holder})")
    if resume:
        if latest_checkpoint(out) is None:
            raise ConfigError(f"--resume: no checkpoint in {out / CKPT_DIR} to resume from")
        check_resumable(cfg, out / CKPT_DIR / "recipe.yaml", out / "recipe.yaml")
    target = None
    if not publish:
        out.mkdir(parents=True, exist_ok=True)
        return _run(
            cfg,
            out,
            out if _main_process() else None,
            resume=resume,
            progress=progress,
            stop_after=stop_after,
            datasets=datasets,
        )
    created = not out.exists()
    if _main_process():
        target = OutputTarget(
            out,
            overwrite=overwrite,
            resume=resume,
            inputs=recipe_inputs(cfg),
            carry=(CKPT_DIR,),
            what="run directory",
            hint="pass --resume to continue it, or --overwrite to start over",
        )
        target.__enter__()
    try:
        if target is not None:
            if overwrite and not resume:  # the old run's working state would mix with the new run's
                for name in (CKPT_DIR, "metrics.jsonl", "tensorboard"):
                    p = out / name
                    shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
            out.mkdir(parents=True, exist_ok=True)
        found = _run(
            cfg,
            out,
            target.staging if target is not None else None,
            resume=resume,
            progress=progress,
            stop_after=stop_after,
            datasets=datasets,
        )
    except BaseException as exc:
        if target is not None:
            if latest_checkpoint(out) is None:  # nothing worth resuming: leave the directory as it was
                _drop_work_state(out, created)
            target.__exit__(type(exc), exc, exc.__traceback__)
        raise
    if target is not None:
        target.__exit__(None, None, None)
        found[0]["files"] = sorted(p.name for p in out.iterdir() if p.is_file())
    return found


def _run(cfg, out: Path, stage: Path | None, *, resume: bool, progress, stop_after, datasets):
    """The run itself: working state in `out`, final files into `stage` (None on processes other than the first)."""
    from accelerate.utils import set_seed

    report = _reporter(progress)
    accel = _accelerator(cfg, find_unused=job_count(cfg) > 1)
    set_seed(cfg.seed)
    backbone = load_backbone(cfg.backbone)
    plan = build_plan(cfg, backbone, datasets)
    jobs, trainable = plan.jobs, plan.trainable
    for job in jobs:
        configure_pipeline(cfg, job.train, job.eval)
        if not is_streaming(job.train):
            job.train = _train_view(cfg, backbone, job.train)
    warnings: list[str] = []
    untrained = cfg.optim.steps == 0 or cfg.optim.epochs == 0  # let through by the recipe check only when allowed
    method = get_method(cfg.method)
    solves = bool(getattr(method, "solves", False))
    fits = method.fits and (solves or not untrained)
    if fits and trainable and not solves:
        unused = unused_parameters(backbone, jobs, trainable)
        if unused:
            for n in unused:
                trainable.pop(n).requires_grad_(False)
            msg = (
                f"{len(unused)} adapter parameter tensor(s) can get no gradient with task "
                f"{'/'.join(j.task.name for j in jobs)} and this head, so they are frozen and not counted as "
                f"trainable: {summarize_names(unused, backbone)}"
            )
            warnings.append(msg)
            report("warning", message=msg)
    if cfg.data.feature_cache:
        _cache_frozen_towers(backbone, jobs, trainable)
    module = _TrainModule(backbone, [j.task for j in jobs])
    module.to(accel.device)
    if accel.is_main_process:
        write_text(out / CKPT_DIR / "recipe.yaml", to_yaml(cfg))  # what the checkpoints belong to
    log = MetricsLog(out, enabled=accel.is_main_process, tensorboard=cfg.logging.tensorboard)
    result: dict[str, Any] = {
        "name": cfg.name,
        "method": cfg.method,
        "backbone": cfg.backbone,
        "task": plan.label,
        "output_dir": str(out),
    }
    result["parameters"] = parameter_counts(backbone, [j.task for j in jobs], trainable)
    if warnings:
        result["warnings"] = warnings
    step = 0
    history: list[dict[str, Any]] = []
    t_fit = time.perf_counter()
    if fits and solves:  # the method's own fit (the linear probe's L-BFGS): no optimiser loop
        result["solver"] = method.solve(backbone, jobs[0].task, cfg, jobs[0].source)
    elif fits:
        step, history = _fit(cfg, accel, module, jobs, trainable, out, log, resume, report, stop_after)
    result["processes"] = accel.num_processes
    if accel.num_processes > 1:
        result["processes_agree"] = _processes_agree(accel, trainable)
    fit_s = time.perf_counter() - t_fit
    result["train_time_s"] = fit_s
    result["step_time_ms"] = 1000.0 * fit_s / step if step else None
    module.eval()
    per_task = {}
    for job in jobs:
        if job.eval is None:
            continue
        job.activate(backbone)
        with torch.no_grad():
            per_task[job.name] = {
                "task": job.task.name,
                "metric": job.task.metric,
                **job.task.evaluate(backbone, _to(job.eval, accel.device), batch_size=cfg.eval.batch_size),
            }
    result["steps"] = step
    plan.finish(result, per_task)
    log.close()
    if accel.is_main_process and stage is not None:
        write_text(stage / "recipe.yaml", to_yaml(cfg))
        plan.write(stage, backbone, result, history)
        if stage != out:
            _finish_logs(out, stage)
    accel.wait_for_everyone()
    report("end", result=result)
    return result, backbone, plan.tasks()


def _drop_work_state(out: Path, created: bool) -> None:
    """After a run failed before its first checkpoint: remove what it wrote in `out` (all of `out` if it made it)."""
    import shutil

    if created:
        shutil.rmtree(out, ignore_errors=True)
        return
    ckpt = out / CKPT_DIR
    (ckpt / "recipe.yaml").unlink(missing_ok=True)
    if ckpt.is_dir() and not any(ckpt.iterdir()):
        ckpt.rmdir()


def _finish_logs(out: Path, stage: Path) -> None:
    """The run's logs join its final files: a copy of metrics.jsonl, the TensorBoard directory moved."""
    import os
    import shutil

    if (out / "metrics.jsonl").is_file():
        shutil.copyfile(out / "metrics.jsonl", stage / "metrics.jsonl")
    if (out / "tensorboard").is_dir():
        os.replace(out / "tensorboard", stage / "tensorboard")


def _cache_frozen_towers(backbone, jobs, trainable) -> None:
    """Swap the inputs of towers that train nothing for their embeddings, computed once (feature cache)."""
    frozen = frozen_towers(backbone, list(trainable))
    if not frozen:
        return
    for job in jobs:
        job.activate(backbone)
        if not is_streaming(job.train):
            job.train = job.task.cache_features(backbone, job.train, frozen, CACHE, train=True)
        if job.eval is not None:
            job.eval = job.task.cache_features(backbone, job.eval, frozen, CACHE)


def parameter_counts(backbone, tasks, trainable) -> dict[str, Any]:
    """Trainable, backbone, adapter and head parameter counts; trainable % as `vlkit.adapters.report` defines it."""
    return counts(backbone, [t.head for t in tasks], trainable)


def unused_parameters(backbone, jobs, trainable: Mapping[str, torch.Tensor]) -> list[str]:
    """Names of trainable parameters that no job's loss depends on (one probe batch of two rows each).

    Data parallelism needs every trainable parameter to get a gradient, and a parameter that cannot get
    one (a text-tower adapter under a linear image head) should not count as trained."""
    names = list(trainable)
    params = [trainable[n] for n in names]
    used = [False] * len(params)
    was = backbone.training
    backbone.train()
    with torch.random.fork_rng(devices=[]):
        for job in jobs:
            job.activate(backbone)
            batch = probe_batch(job.train)
            loss = job.task.loss(backbone, batch)
            if not loss.requires_grad:
                continue
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            used = [u or g is not None for u, g in zip(used, grads, strict=True)]
    backbone.train(was)
    return [n for n, u in zip(names, used, strict=True) if not u]


def probe_batch(data) -> dict[str, torch.Tensor]:
    """The first two rows of prepared (or streaming) training data."""
    if is_streaming(data):
        _, index, rows = next(data.raw_batches(2))
        return data.prepare_rows(rows, 0, index)
    return take(data, list(range(min(2, len(next(iter(data.values())))))), 0)


def summarize_names(names: list[str], backbone=None, limit: int = 3) -> str:
    """The frozen parameters by tower: how many modules, and the first few of them."""
    mods = list(dict.fromkeys(n.replace("backbone.model.", "").rsplit(".", 1)[0] for n in names))
    prefixes = backbone.tower_prefixes() if backbone is not None else {}
    groups: dict[str, list[str]] = {}
    for m in mods:
        tower = next((t for t, ps in prefixes.items() if any(m.startswith(p) for p in ps)), "other")
        groups.setdefault(tower, []).append(m)
    parts = []
    for tower, ms in groups.items():
        more = f" and {len(ms) - limit} more" if len(ms) > limit else ""
        parts.append(f"{tower} tower ({len(ms)} modules: {', '.join(ms[:limit])}{more})")
    return "; ".join(parts)


def _processes_agree(accel, trainable: Mapping[str, torch.Tensor]) -> bool:
    """Every process holds bit-identical trainable weights (data parallelism kept them in sync)."""
    flat = torch.cat([p.detach().reshape(-1).double() for p in trainable.values()]).to(accel.device)
    gathered = accel.gather(flat.unsqueeze(0))
    return bool((gathered == gathered[0:1]).all())


def _to(data, device):
    """Prepared data on `device`: tensors moved, lazy image columns left to stream."""
    return {k: v if isinstance(v, LazyImages) else v.to(device) for k, v in data.items()}


def param_groups(trainable: dict[str, torch.Tensor], lr: float, head_lr: float | None) -> list[dict[str, Any]]:
    """Optimiser groups: the task head at `head_lr` when it is set, everything else at `lr`."""
    head = [p for n, p in trainable.items() if n.startswith("head.")]
    rest = [p for n, p in trainable.items() if not n.startswith("head.")]
    if head_lr is None or not head:
        return [{"params": rest + head, "lr": lr}]
    return [g for g in ({"params": rest, "lr": lr}, {"params": head, "lr": head_lr}) if g["params"]]


def consumed_batches(step: int, job: int, n_jobs: int, accum: int) -> int:
    """Micro-batches job `job` has read after `step` round-robin steps."""
    return ((step - job + n_jobs - 1) // n_jobs) * accum if step > job else 0


def _fit(cfg, accel, module, jobs, trainable, out, log, resume, report, stop_after):
    params = list(trainable.values())
    groups = param_groups(trainable, cfg.optim.lr, cfg.optim.head_lr)
    optimizer: torch.optim.Optimizer
    if cfg.optim.optimizer == "sgd":
        optimizer = torch.optim.SGD(groups, lr=cfg.optim.lr, momentum=0.9, weight_decay=cfg.optim.weight_decay)
    else:
        optimizer = torch.optim.AdamW(groups, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    world, rank = accel.num_processes, accel.process_index
    bs, accum = cfg.optim.batch_size, cfg.optim.grad_accum
    sizes = [None if is_streaming(j.train) else num_rows(j.train) for j in jobs]
    known = [n for n in sizes if n is not None]  # a streaming job needs optim.steps (checked with the jobs)
    total = (
        cfg.optim.steps
        if cfg.optim.steps is not None
        else cfg.optim.epochs * sum(steps_per_epoch(n, bs, accum, world) for n in known)
    )
    if total < 1:
        raise ConfigError("optim.steps (or epochs) gives no training step; set optim.steps >= 1")
    scheduler = _scheduler(optimizer, cfg.optim.schedule, cfg.optim.warmup_steps, total)
    model, optimizer = accel.prepare(module, optimizer)
    raw_opt = optimizer.optimizer if hasattr(optimizer, "optimizer") else optimizer
    step_fn = compiled_step(model, cfg.compile, accel.device, report)  # parameters stay the module's own
    step = 0
    history: list[dict[str, Any]] = []
    if resume:
        ckpt = latest_checkpoint(out)
        assert ckpt is not None, "run() checked that there is one"
        state = load_checkpoint(ckpt, trainable, raw_opt, scheduler)
        step = int(state["step"])
        history = list(state.get("history", []))
        if accel.is_main_process:
            log.truncate_after(step)
    streams = []
    for i, (j, n) in enumerate(zip(jobs, sizes, strict=True)):
        start = consumed_batches(step, i, len(jobs), accum)
        loader = (
            stream_loader(j.train, bs, rank=rank, world=world, start=start)
            if n is None
            else make_loader(j.train, SeededBatches(n, bs, j.seed, rank, world, start=start), train=True)
        )
        streams.append(iter(loader))
    model.train()
    report("start", total=total, step=step)
    t0, seen = time.perf_counter(), 0
    try:
        while step < total:
            ji = step % len(jobs)
            job = jobs[ji]
            job.activate(module.backbone)
            loss_sum = 0.0
            for micro in range(accum):
                batch = next(streams[ji])
                batch = {k: v.to(accel.device, non_blocking=True) for k, v in batch.items()}
                sync = micro == accum - 1
                ctx = accel.no_sync(model) if (not sync and world > 1) else contextlib.nullcontext()
                with ctx, accel.autocast():
                    loss = step_fn(batch, ji) / accum
                accel.backward(loss)
                loss_sum += float(loss.detach())
                seen += len(next(iter(batch.values()))) * world
            if cfg.optim.max_grad_norm:
                accel.clip_grad_norm_(params, cfg.optim.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            lr = scheduler.get_last_lr()[0]
            rate = seen / max(1e-9, time.perf_counter() - t0)
            consumed = consumed_batches(step, ji, len(jobs), accum)
            epoch = None
            if sizes[ji] is not None:
                per_proc = sizes[ji] // world if world > 1 else sizes[ji]
                epoch = (consumed - 1) // max(1, math.ceil(per_proc / bs))
            row: dict[str, Any] = {"step": step, "epoch": epoch, "loss": loss_sum, "lr": lr, "samples_per_s": rate}
            if job.name and len(jobs) > 1:
                row.update({"task": job.name, f"loss/{job.name}": loss_sum})
            if cfg.eval.every_steps and step % cfg.eval.every_steps == 0 and step < total:
                model.eval()
                for other in jobs:
                    if other.eval is None:
                        continue
                    other.activate(module.backbone)
                    with torch.no_grad():
                        metrics = other.task.evaluate(
                            module.backbone, _to(other.eval, accel.device), cfg.eval.batch_size
                        )
                    prefix = f"eval/{other.name}/" if len(jobs) > 1 else "eval/"
                    row.update({f"{prefix}{k}": v for k, v in metrics.items()})
                model.train()
            if step % max(1, cfg.logging.every_steps) == 0 or step == total or any(k.startswith("eval/") for k in row):
                log.write(row)
                history.append(row)
            report("step", step=step, total=total, loss=loss_sum, lr=lr, rate=rate)
            if cfg.checkpoint.every_steps and step % cfg.checkpoint.every_steps == 0 and step < total:
                if accel.is_main_process:
                    save_checkpoint(
                        out, step, trainable, raw_opt, scheduler, {"history": history}, keep=cfg.checkpoint.keep
                    )
                accel.wait_for_everyone()
            if stop_after is not None and step >= stop_after:
                break
    finally:
        del streams
    return step, history
