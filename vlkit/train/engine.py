"""The training engine: Accelerate for devices, precision and data parallelism; deterministic resume.

Data are prepared once into tensors by the task; each process takes its shard of a per-epoch seeded
permutation, so a resumed run replays exactly the batches an uninterrupted run would have seen.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from ..io import write_json, write_text
from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from .logs import MetricsLog, plot_curves
from .methods import apply_method


class _TrainModule(nn.Module):
    """Backbone and task head under one module so DDP and Accelerate see every trainable parameter."""

    def __init__(self, backbone, task):
        super().__init__()
        self.backbone = backbone
        self.head = task.head
        object.__setattr__(self, "_task", task)

    def forward(self, batch):
        return self._task.loss(self.backbone, batch)


def _scheduler(optimizer, kind: str, warmup: int, total: int):
    def factor(step: int) -> float:
        if warmup > 0 and step < warmup:
            return (step + 1) / warmup
        if kind == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        if kind == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _accelerator(cfg):
    from accelerate import Accelerator

    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' was asked for but no CUDA device is available (use device=auto or cpu)")
    mp = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[cfg.precision]
    if mp == "fp16" and not torch.cuda.is_available():
        raise ConfigError("precision fp16 needs a CUDA device; on CPU use bf16 or fp32")
    try:
        cpu = cfg.device == "cpu" or (cfg.device == "auto" and not torch.cuda.is_available())
        return Accelerator(cpu=cpu, mixed_precision=mp)
    except (ValueError, RuntimeError) as exc:
        raise ConfigError(f"cannot set up device {cfg.device!r} with precision {cfg.precision!r}: {exc}") from None


def build_task(backbone, cfg, train_ds):
    from omegaconf import OmegaConf

    from ..plugins import registry

    options = OmegaConf.to_container(cfg.task.options, resolve=True) or {}
    if cfg.method == "linear" and cfg.task.name == "classification":
        options.setdefault("head", "linear")
    return registry("task").get(cfg.task.name)(backbone, train_ds, **options)


def _load_source(spec: dict, task: str):
    """One data source; `{"mix": [spec, ...]}` concatenates several on the task's required columns."""
    from ..data import load_data, required_fields

    if "mix" in spec:
        import datasets

        parts = []
        for sub in spec["mix"]:
            sub = dict(sub)
            sub.setdefault("task", task)
            ds = load_data(sub)
            parts.append(ds.select_columns(list(required_fields(task))))
        return datasets.concatenate_datasets(parts)
    return load_data(spec)


def load_datasets(cfg):
    from omegaconf import OmegaConf

    train = OmegaConf.to_container(cfg.data.train, resolve=True)
    train.setdefault("task", cfg.task.name)
    shots = train.pop("shots", None)
    train_ds = _load_source(train, cfg.task.name)
    if shots is not None:
        train_ds = few_shot(train_ds, int(shots), seed=cfg.seed)
    eval_ds = None
    if cfg.data.eval is not None:
        ev = OmegaConf.to_container(cfg.data.eval, resolve=True)
        ev.setdefault("task", cfg.task.name)
        eval_ds = _load_source(ev, cfg.task.name)
    return train_ds, eval_ds


def few_shot(ds, shots: int, seed: int = 0, column: str = "label"):
    """The first `shots` examples of each class after a seeded shuffle (every class must have that many)."""
    if shots < 1:
        raise ConfigError(f"shots must be >= 1, got {shots}")
    if column not in ds.column_names:
        raise ConfigError(f"few-shot selection needs a {column!r} column; this dataset has {ds.column_names}")
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(ds), generator=g).tolist()
    labels = ds[column]
    taken: dict[int, list[int]] = {}
    for i in order:
        bucket = taken.setdefault(labels[i], [])
        if len(bucket) < shots:
            bucket.append(i)
    short = {k: len(v) for k, v in taken.items() if len(v) < shots}
    if short:
        raise ConfigError(f"not enough examples for {shots} shots in classes {sorted(short)} (have {short})")
    return ds.select(sorted(i for v in taken.values() for i in v))


def _micro_batches(n: int, batch_size: int, seed: int, rank: int, world: int):
    """Endless (epoch, index tensor) stream: a seeded permutation per epoch, sharded across processes."""
    epoch = 0
    per_proc = n // world if world > 1 else n
    while True:
        g = torch.Generator().manual_seed(seed * 100003 + epoch)
        perm = torch.randperm(n, generator=g)
        if world > 1:
            perm = perm[rank::world][:per_proc]
        for i in range(0, len(perm), batch_size):
            yield epoch, perm[i:i + batch_size]
        epoch += 1


def steps_per_epoch(n: int, batch_size: int, grad_accum: int, world: int) -> int:
    per_proc = n // world if world > 1 else n
    return max(1, math.ceil(math.ceil(per_proc / batch_size) / grad_accum))


def train(cfg, out_dir: str | Path | None = None, *, resume: bool = False, progress: bool = True,
          stop_after: int | None = None) -> dict[str, Any]:
    """Run a recipe. Returns the final metrics and where everything was written."""
    return run(cfg, out_dir, resume=resume, progress=progress, stop_after=stop_after)[0]


def run(cfg, out_dir: str | Path | None = None, *, resume: bool = False, progress: bool = True,
        stop_after: int | None = None, datasets: tuple | None = None):
    """Like `train`, and also returns the trained backbone and task: (result, backbone, task).

    A recipe with `tasks` trains one adapter per task (vlkit.compose.multitask); the third item is then
    a {adapter name: task} dict."""
    if cfg.get("tasks"):
        if resume or stop_after is not None:
            raise ConfigError("--resume and stop_after are not supported for multi-task recipes")
        from ..compose.multitask import run_multitask

        return run_multitask(cfg, out_dir, progress=progress)
    from accelerate.utils import set_seed
    from omegaconf import OmegaConf

    from ..adapters.files import save_adapter
    from ..backbones.loading import load_backbone

    out = Path(out_dir or cfg.output_dir or f"runs/{cfg.name}")
    if resume and latest_checkpoint(out) is None:
        raise ConfigError(f"--resume: no checkpoint in {out / 'checkpoints'} to resume from")
    accel = _accelerator(cfg)
    set_seed(cfg.seed)
    backbone = load_backbone(cfg.backbone)
    train_ds, eval_ds = datasets if datasets is not None else load_datasets(cfg)
    task = build_task(backbone, cfg, train_ds)
    adapter_opts = OmegaConf.to_container(cfg.adapter, resolve=True)
    adapter, trainable = apply_method(backbone, task, cfg, adapter_opts)
    train_data = task.prepare(backbone, train_ds)
    eval_data = task.prepare(backbone, eval_ds) if eval_ds is not None else None
    module = _TrainModule(backbone, task)
    module.to(accel.device)
    if accel.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        write_text(out / "recipe.yaml", OmegaConf.to_yaml(cfg))
    log = MetricsLog(out, enabled=accel.is_main_process, tensorboard=cfg.logging.tensorboard)
    result: dict[str, Any] = {"name": cfg.name, "method": cfg.method, "backbone": cfg.backbone,
                              "task": cfg.task.name, "output_dir": str(out)}
    n_trainable = sum(p.numel() for p in trainable.values())
    n_backbone = sum(p.numel() for p in backbone.base_parameters().values())
    n_adapter = sum(p.numel() for n, p in backbone.model.named_parameters() if ".adapters." in n or ".fusions." in n)
    n_head = sum(p.numel() for p in task.head.parameters())
    result["parameters"] = {"trainable": n_trainable, "backbone": n_backbone, "adapter": n_adapter,
                            "head": n_head,
                            "trainable_percent": 100.0 * n_trainable / max(1, n_backbone + n_adapter + n_head)}
    step = 0
    history: list[dict[str, Any]] = []
    t_fit = time.perf_counter()
    if cfg.method != "zeroshot":
        step, history = _fit(cfg, accel, module, task, trainable, train_data, eval_data, out, log,
                             resume, progress, stop_after)
    result["processes"] = accel.num_processes
    if accel.num_processes > 1:
        result["processes_agree"] = _processes_agree(accel, trainable)
    fit_s = time.perf_counter() - t_fit
    result["train_time_s"] = fit_s
    result["step_time_ms"] = 1000.0 * fit_s / step if step else None
    module.eval()
    final = {}
    if eval_data is not None:
        with torch.no_grad():
            final = task.evaluate(backbone, _to(eval_data, accel.device), batch_size=cfg.eval.batch_size)
    result.update({"steps": step, "metrics": final, "primary_metric": task.metric,
                   "score": final.get(task.metric)})
    if accel.is_main_process:
        _write_outputs(cfg, out, backbone, task, adapter, result, history, log, save_adapter)
    accel.wait_for_everyone()
    log.close()
    return result, backbone, task


def _processes_agree(accel, trainable: dict[str, torch.Tensor]) -> bool:
    """Every process holds bit-identical trainable weights (data parallelism kept them in sync)."""
    flat = torch.cat([p.detach().reshape(-1).double() for p in trainable.values()]).to(accel.device)
    gathered = accel.gather(flat.unsqueeze(0))
    return bool((gathered == gathered[0:1]).all())


def _to(data: dict[str, torch.Tensor], device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in data.items()}


def param_groups(trainable: dict[str, torch.Tensor], lr: float, head_lr: float | None) -> list[dict[str, Any]]:
    """Optimiser groups: the task head at `head_lr` when it is set, everything else at `lr`."""
    head = [p for n, p in trainable.items() if n.startswith("head.")]
    rest = [p for n, p in trainable.items() if not n.startswith("head.")]
    if head_lr is None or not head:
        return [{"params": rest + head, "lr": lr}]
    return [g for g in ({"params": rest, "lr": lr}, {"params": head, "lr": head_lr}) if g["params"]]


def _fit(cfg, accel, module, task, trainable, train_data, eval_data, out, log, resume, progress, stop_after):
    from ..tasks.base import num_examples

    params = list(trainable.values())
    groups = param_groups(trainable, cfg.optim.lr, cfg.optim.head_lr)
    if cfg.optim.optimizer == "sgd":
        optimizer = torch.optim.SGD(groups, lr=cfg.optim.lr, momentum=0.9, weight_decay=cfg.optim.weight_decay)
    else:
        optimizer = torch.optim.AdamW(groups, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    n = num_examples(train_data)
    world, rank = accel.num_processes, accel.process_index
    bs, accum = cfg.optim.batch_size, cfg.optim.grad_accum
    spe = steps_per_epoch(n, bs, accum, world)
    total = cfg.optim.steps if cfg.optim.steps is not None else cfg.optim.epochs * spe
    scheduler = _scheduler(optimizer, cfg.optim.schedule, cfg.optim.warmup_steps, total)
    model, optimizer = accel.prepare(module, optimizer)
    step = 0
    history: list[dict[str, Any]] = []
    if resume:
        ckpt = latest_checkpoint(out)
        state = load_checkpoint(ckpt, trainable, optimizer.optimizer if hasattr(optimizer, "optimizer") else optimizer,
                                scheduler)
        step = int(state["step"])
        history = list(state.get("history", []))
    stream = _micro_batches(n, bs, cfg.seed, rank, world)
    for _ in range(step * accum):
        next(stream)
    model.train()
    bar = _progress(progress and accel.is_main_process, total, step)
    t0, seen = time.perf_counter(), 0
    try:
        while step < total:
            loss_sum = 0.0
            for micro in range(accum):
                epoch, idx = next(stream)
                batch = {k: v[idx].to(accel.device) for k, v in train_data.items()}
                sync = micro == accum - 1
                ctx = accel.no_sync(model) if (not sync and world > 1) else _null()
                with ctx, accel.autocast():
                    loss = model(batch) / accum
                accel.backward(loss)
                loss_sum += float(loss.detach())
                seen += len(idx) * world
            if cfg.optim.max_grad_norm:
                accel.clip_grad_norm_(params, cfg.optim.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            lr = scheduler.get_last_lr()[0]
            rate = seen / max(1e-9, time.perf_counter() - t0)
            row: dict[str, Any] = {"step": step, "epoch": epoch, "loss": loss_sum, "lr": lr, "samples_per_s": rate}
            if eval_data is not None and cfg.eval.every_steps and step % cfg.eval.every_steps == 0 and step < total:
                model.eval()
                with torch.no_grad():
                    metrics = task.evaluate(module.backbone, _to(eval_data, accel.device), cfg.eval.batch_size)
                model.train()
                row.update({f"eval/{k}": v for k, v in metrics.items()})
            if step % max(1, cfg.logging.every_steps) == 0 or step == total or any(k.startswith("eval/") for k in row):
                log.write(row)
                history.append(row)
            if bar is not None:
                bar.update(step, loss_sum, lr, rate)
            if cfg.checkpoint.every_steps and step % cfg.checkpoint.every_steps == 0 and step < total:
                if accel.is_main_process:
                    save_checkpoint(out, step, trainable, optimizer.optimizer if hasattr(optimizer, "optimizer")
                                    else optimizer, scheduler, {"history": history}, keep=cfg.checkpoint.keep)
                accel.wait_for_everyone()
            if stop_after is not None and step >= stop_after:
                break
    finally:
        if bar is not None:
            bar.close()
    return step, history


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class _Bar:
    def __init__(self, total: int, start: int):
        from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

        from ..cli.output import console

        self.p = Progress(TextColumn("[bold]train"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                          TextColumn("{task.fields[info]}"), TimeRemainingColumn(), console=console, transient=False)
        self.p.start()
        self.t = self.p.add_task("train", total=total, completed=start, info="")

    def update(self, step, loss, lr, rate):
        self.p.update(self.t, completed=step, info=f"loss {loss:.4f} lr {lr:.2e} {rate:.0f} samples/s")

    def close(self):
        self.p.stop()


def _progress(enabled: bool, total: int, start: int):
    return _Bar(total, start) if enabled else None


def _write_outputs(cfg, out, backbone, task, adapter, result, history, log, save_adapter):
    from safetensors.torch import save_file

    from ..io import atomic_path

    meta = task.metadata()
    if adapter is not None:
        save_adapter(backbone, out, name=adapter, task=meta)
        result["adapter"] = adapter
        if getattr(backbone, "compose_base", None):  # trained on top of a composition: `out` is one too
            from ..compose.resolve import write_base_composition

            write_base_composition(out, backbone, adapter)
    elif cfg.method == "full":
        state = {k: v.detach().cpu().contiguous() for k, v in backbone.model.state_dict().items()}
        with atomic_path(out / "backbone.safetensors") as tmp:
            save_file(state, str(tmp))
    head = task.head_state()
    if head:
        with atomic_path(out / "head.safetensors") as tmp:
            save_file(head, str(tmp))
    write_json(out / "task.json", meta)
    if cfg.method == "fuse":
        from ..compose.fusion import write_fuse_outputs

        write_fuse_outputs(cfg, out, backbone)
    write_json(out / "metrics.json", result)
    if cfg.logging.plot and history:
        plot_curves(history, out / "training_curves.png", task.metric)
    result["files"] = sorted(p.name for p in Path(out).iterdir() if p.is_file())
