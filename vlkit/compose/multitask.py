"""Multi-task adapter training on one frozen backbone, with VL-Adapter's sharing schemes (Sung et al. 2022).

A recipe with `tasks: [{name, options, data, adapter}, ...]` trains one adapter per task, round-robin:
step s runs a batch of task s mod T with that task's adapter active. `sharing` ties parameters across
the task adapters (the same module object, so one copy in memory and one gradient):

- `per_task`          nothing shared: independent adapters (trained together, same budget);
- `half_shared_down`  the down-projection is shared (bottleneck/fusion `down`, LoRA `lora_A`), each task
                      keeps its own up-projection;
- `half_shared_up`    the up-projection is shared (bottleneck/fusion `up`, LoRA `lora_B`);
- `shared`            a single adapter for all tasks (only the task heads differ).

Outputs: `adapters/<name>/` per task (a complete adapter directory — shared tensors copied in — with
task.json, head.safetensors and a single-task recipe.yaml naming its data), `shared.safetensors` (the
shared tensors, once), `composition.json` (mode `route`: pick an adapter with --task/--adapter; loading
re-ties the shared parameters) and metrics.json.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError, IncompatibleAdapterError

SHARING = ("per_task", "half_shared_down", "half_shared_up", "shared")
SHARED_PARTS = {
    "bottleneck": {"half_shared_down": ("down",), "half_shared_up": ("up",), "shared": ("down", "up")},
    "fusion": {"half_shared_down": ("down",), "half_shared_up": ("up",)},
    "lora": {"half_shared_down": ("lora_A",), "half_shared_up": ("lora_B",), "shared": ("lora_A", "lora_B")},
}


def shared_parts(variant: str, sharing: str) -> tuple[str, ...]:
    if sharing not in SHARING:
        raise ConfigError(f"sharing must be one of {', '.join(SHARING)}, got {sharing!r}")
    if sharing == "per_task":
        return ()
    parts = SHARED_PARTS.get(variant, {}).get(sharing)
    if parts is None:
        if sharing == "shared":
            return ("*",)
        raise ConfigError(f"sharing {sharing!r} is not defined for adapter variant {variant!r} "
                          f"(defined for {', '.join(k for k, v in SHARED_PARTS.items() if sharing in v)})")
    return parts


def tie_shared(backbone, names: list[str], sharing: str, check: bool = True) -> dict[str, torch.Tensor]:
    """Make adapters `names` share their parts per `sharing` (the first adapter's objects are used by all).

    With `check`, the tied tensors must already be equal (re-tying loaded copies). Returns the shared
    tensors by `<site path>.<part param>`."""
    from ..adapters.inject import adapter_layers, host_of

    if sharing == "per_task" or len(names) < 1:
        return {}
    rec0 = backbone.adapter_records[names[0]]
    parts = shared_parts(rec0.variant, sharing)
    first = adapter_layers(backbone, names[0])
    for n in names[1:]:
        rec = backbone.adapter_records[n]
        if rec.variant != rec0.variant or [s.path for s in rec.sites] != [s.path for s in rec0.sites]:
            raise IncompatibleAdapterError(f"adapters {names[0]} and {n} cannot share parameters: different "
                                           "variant or sites")
        for site in rec.sites:
            host = host_of(backbone, site)
            layer, src = host.adapters[n][site.key], first[site.path]
            for part in parts:
                mine, theirs = (layer, src) if part == "*" else (getattr(layer, part), getattr(src, part))
                if mine is theirs:
                    continue
                if check and not all(torch.equal(a, b) for a, b in zip(_tensors(mine), _tensors(theirs))):
                    raise IncompatibleAdapterError(f"adapters {names[0]} and {n} were saved as sharing {part!r} "
                                                   f"at {site.path}, but their weights differ")
                if part == "*":
                    host.adapters[n][site.key] = src
                else:
                    setattr(layer, part, theirs)
    shared = {}
    for path, layer in first.items():
        for part in parts:
            mod = layer if part == "*" else getattr(layer, part)
            if isinstance(mod, torch.nn.Parameter):
                shared[f"{path}.{part}"] = mod.data
            else:
                prefix = f"{path}." if part == "*" else f"{path}.{part}."
                shared.update({prefix + k: v for k, v in mod.state_dict().items()})
    return shared


def _tensors(obj):
    return [obj.data] if isinstance(obj, torch.nn.Parameter) else list(obj.state_dict().values())


def task_recipe(cfg, tcfg, name: str):
    """The single-task recipe of one entry of `tasks` (saved with its adapter; the router reads its data)."""
    from omegaconf import OmegaConf

    sub = OmegaConf.merge(cfg, {"name": name, "tasks": [], "sharing": "per_task",
                                "task": {"name": tcfg.name, "options": tcfg.options}})
    sub.data = tcfg.data
    return sub


def run_multitask(cfg, out_dir: str | Path | None = None, *, progress: bool = True,
                  datasets: dict[str, tuple] | None = None):
    """Train the recipe's `tasks` with its `sharing` scheme; returns (result, backbone, {name: task}).

    `datasets`: optional {adapter name: (train Dataset, eval Dataset or None)} instead of loading each
    task's `data`."""
    from accelerate.utils import set_seed
    from omegaconf import OmegaConf

    from ..adapters.files import save_adapter
    from ..adapters.inject import adapter_layers, inject
    from ..backbones.loading import load_backbone
    from ..io import write_json, write_text
    from ..train.engine import _accelerator, _micro_batches, _scheduler, _to, build_task, load_datasets
    from ..train.logs import MetricsLog
    from ..train.methods import adapter_name_for
    from .composition import write_composition

    out = Path(out_dir or cfg.output_dir or f"runs/{cfg.name}")
    accel = _accelerator(cfg)
    set_seed(cfg.seed)
    backbone = load_backbone(cfg.backbone)
    opts = OmegaConf.to_container(cfg.adapter, resolve=True)
    variant = opts.pop("variant")
    opts.pop("name", None)
    shared_parts(variant, cfg.sharing)
    entries = []
    for tcfg in cfg.tasks:
        name = adapter_name_for(tcfg.adapter or tcfg.name)
        if any(e["name"] == name for e in entries):
            raise ConfigError(f"two tasks would both use adapter {name!r}; give each an `adapter` name")
        sub = task_recipe(cfg, tcfg, name)
        train_ds, eval_ds = (datasets or {}).get(name) or load_datasets(sub)
        task = build_task(backbone, sub, train_ds)
        inject(backbone, variant, name=name, **opts)
        entries.append({"name": name, "cfg": sub, "task": task, "train": task.prepare(backbone, train_ds),
                        "eval": task.prepare(backbone, eval_ds) if eval_ds is not None else None})
    names = [e["name"] for e in entries]
    tie_shared(backbone, names, cfg.sharing, check=False)
    for n in names:
        for layer in adapter_layers(backbone, n).values():
            for p in layer.parameters():
                p.requires_grad_(True)
    backbone.to(accel.device)
    params: dict[int, torch.nn.Parameter] = {}
    for p in backbone.parameters():
        if p.requires_grad:
            params.setdefault(id(p), p)
    n_adapter = sum(p.numel() for p in params.values())
    for e in entries:
        e["task"].head.to(accel.device)
        for p in e["task"].head.parameters():
            p.requires_grad_(True)
            params.setdefault(id(p), p)
    plist = list(params.values())
    o = cfg.optim
    optimizer = (torch.optim.SGD(plist, lr=o.lr, momentum=0.9, weight_decay=o.weight_decay) if o.optimizer == "sgd"
                 else torch.optim.AdamW(plist, lr=o.lr, weight_decay=o.weight_decay))
    sizes = [len(next(iter(e["train"].values()))) for e in entries]
    total = o.steps if o.steps is not None else o.epochs * sum(max(1, -(-s // o.batch_size)) for s in sizes)
    scheduler = _scheduler(optimizer, o.schedule, o.warmup_steps, total)
    streams = [_micro_batches(s, o.batch_size, cfg.seed + 7919 * i, 0, 1) for i, s in enumerate(sizes)]
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "recipe.yaml", OmegaConf.to_yaml(cfg))
    log = MetricsLog(out, tensorboard=cfg.logging.tensorboard)
    history: list[dict[str, Any]] = []
    backbone.train()
    t0 = time.perf_counter()
    for step in range(1, total + 1):
        i = (step - 1) % len(entries)
        e = entries[i]
        backbone.set_active(e["name"])
        e["task"].head.train()
        _, idx = next(streams[i])
        batch = {k: v[idx].to(accel.device) for k, v in e["train"].items()}
        with accel.autocast():
            loss = e["task"].loss(backbone, batch)
        loss.backward()
        if o.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(plist, o.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        row = {"step": step, "task": e["name"], f"loss/{e['name']}": float(loss.detach()),
               "lr": scheduler.get_last_lr()[0]}
        if step % max(1, cfg.logging.every_steps) == 0 or step == total:
            log.write(row)
            history.append(row)
        if progress and step % 50 == 0:
            from ..cli.output import console

            console.print(f"multitask step {step}/{total}  {e['name']} loss {float(loss.detach()):.4f}")
    fit_s = time.perf_counter() - t0
    backbone.eval()
    per_task, metrics = {}, {}
    for e in entries:
        backbone.set_active(e["name"])
        if e["eval"] is not None:
            with torch.no_grad():
                m = e["task"].evaluate(backbone, _to(e["eval"], accel.device), batch_size=cfg.eval.batch_size)
            per_task[e["name"]] = {"task": e["task"].name, "metric": e["task"].metric, **m}
            metrics.update({f"{e['name']}/{k}": v for k, v in m.items()})
    scores = [v[v["metric"]] for v in per_task.values()]
    n_base = sum(p.numel() for p in backbone.base_parameters().values())
    result = {"name": cfg.name, "method": cfg.method, "backbone": cfg.backbone, "task": "multitask",
              "tasks": names, "sharing": cfg.sharing, "output_dir": str(out), "steps": total,
              "train_time_s": fit_s, "step_time_ms": 1000.0 * fit_s / max(1, total),
              "parameters": {"trainable": sum(p.numel() for p in plist), "backbone": n_base,
                             "adapter": n_adapter, "trainable_percent": 100.0 * sum(p.numel() for p in plist)
                             / max(1, n_base + n_adapter)},
              "metrics": metrics, "per_task": per_task, "primary_metric": "mean of task metrics",
              "score": sum(scores) / len(scores) if scores else None}
    sources = []
    for e in entries:
        d = out / "adapters" / e["name"]
        meta = e["task"].metadata()
        save_adapter(backbone, d, name=e["name"], task=meta, extra={"sharing": cfg.sharing, "shared_with": names})
        head = e["task"].head_state()
        if head:
            from safetensors.torch import save_file

            save_file(head, str(d / "head.safetensors"))
        write_json(d / "task.json", meta)
        write_text(d / "recipe.yaml", OmegaConf.to_yaml(e["cfg"]))
        sources.append((e["name"], d))
    extra: dict[str, Any] = {"sharing": cfg.sharing}
    shared = tie_shared(backbone, names, cfg.sharing, check=False)
    if shared:
        from safetensors.torch import save_file

        save_file({k: v.detach().cpu().contiguous().clone() for k, v in shared.items()},
                  str(out / "shared.safetensors"))
        extra["shared_parameters"] = {"file": "shared.safetensors", "tensors": len(shared),
                                      "numel": int(sum(v.numel() for v in shared.values()))}
    write_composition(out, "route", backbone, sources, extra=extra)
    write_json(out / "metrics.json", result)
    log.close()
    return result, backbone, {e["name"]: e["task"] for e in entries}
