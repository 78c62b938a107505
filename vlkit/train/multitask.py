"""Multi-task adapter training on one frozen backbone, through the one training engine.

A recipe with `tasks: [{name, options, data, adapter}, ...]` trains one adapter per task, round-robin:
step s runs a batch of task (s - 1) mod T with that task's adapter active. `sharing` ties parameters
across the task adapters (`vlkit.compose.sharing`: per_task, half_shared_down, half_shared_up, shared).
Each task's job is prepared exactly as its own single-task recipe would be (`vlkit.train.jobs.prepare_job`:
the method's `prepare`, so a variant's `options_from_data` and `init_from_data` see that task and its data).

Outputs: `adapters/<name>/` per task (a complete adapter directory — shared tensors copied in — with
task.json, head.safetensors and a single-task recipe.yaml naming its data), `shared.safetensors` (the
shared tensors, once), `composition.json` (mode `route`: pick an adapter with --task/--adapter; loading
re-ties the shared parameters) and metrics.json.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Any

import torch

from ..adapters.inject import save_adapter
from ..compose.composition import write_composition
from ..compose.sharing import shared_parts, tie_shared
from ..errors import ConfigError
from ..io import atomic_path, write_json, write_text
from .jobs import Job, prepare_job
from .methods import adapter_name_for, freeze, get_method, trainable_parameters
from .recipe import TaskCfg, plain, to_yaml


def task_recipe(cfg, tcfg, name: str):
    """The single-task recipe of one entry of `tasks` (saved with its adapter; the router reads its data)."""

    return dataclasses.replace(
        cfg,
        name=name,
        tasks=[],
        sharing="per_task",
        task=TaskCfg(name=tcfg.name, options=copy.deepcopy(tcfg.options)),
        data=copy.deepcopy(tcfg.data),
    )


def multitask_jobs(cfg, backbone, datasets: dict[str, tuple]) -> tuple[list[Job], dict[str, torch.nn.Parameter]]:
    """One job per entry of `tasks`, each prepared exactly as the single-task recipe of that task would be (its
    method's `prepare`: options from the data, injection, init from the data), then tied per `sharing`.
    Returns (jobs, trainable parameters); heads are named `head.<adapter>.<param>`.

    `datasets`: optional {adapter name: (train Dataset, eval Dataset or None)} instead of each task's `data`."""

    opts = plain(cfg.adapter)
    opts.pop("name", None)
    adapters = cfg.method == "adapter"  # else method full: one model fine-tuned on every task, nothing to tie
    if adapters:
        shared_parts(opts["variant"], cfg.sharing)
    method = get_method(cfg.method)
    freeze(backbone)
    jobs: list[Job] = []
    trains: set[str] = set()  # a later injection freezes the earlier adapters: what each job's prepare made trainable
    for i, tcfg in enumerate(cfg.tasks):
        name = adapter_name_for(tcfg.adapter or tcfg.name)
        if any(j.name == name for j in jobs):
            raise ConfigError(f"two tasks would both use adapter {name!r}; give each an `adapter` name")
        sub = task_recipe(cfg, tcfg, name)
        jobs.append(
            prepare_job(
                backbone,
                sub,
                name=name,
                seed=cfg.seed + 7919 * i,
                adapter_options=dict(opts),
                datasets=datasets.get(name),
                method=method,
            )
        )
        trains.update(n for n, p in backbone.named_parameters(remove_duplicate=False) if p.requires_grad)
    if adapters:
        tie_shared(backbone, [j.name for j in jobs if j.name is not None], cfg.sharing, check=False)
    for n, p in backbone.named_parameters(remove_duplicate=False):
        if n in trains:
            p.requires_grad_(True)
    return jobs, trainable_parameters(backbone, {f"head.{j.name}.": j.task.head for j in jobs})


def multitask_result(result: dict[str, Any], cfg, per_task: dict[str | None, dict]) -> None:
    """Fill a multi-task run's result: per-task metrics, their mean as the score."""
    result.update(
        {
            "tasks": [t.adapter or t.name for t in cfg.tasks],
            "sharing": cfg.sharing,
            "per_task": per_task,
            "primary_metric": "mean of task metrics",
            "metrics": {
                f"{name}/{k}": v for name, m in per_task.items() for k, v in m.items() if k not in ("task", "metric")
            },
        }
    )
    scores = [v[v["metric"]] for v in per_task.values()]
    result["score"] = sum(scores) / len(scores) if scores else None


def write_multitask_outputs(cfg, out: Path, backbone, jobs, result: dict[str, Any]) -> None:
    """adapters/<name>/ per task, shared.safetensors, composition.json (mode route) and metrics.json; with
    method `full`, the fine-tuned backbone.safetensors and tasks/<name>/ (task.json, head) per task instead."""
    from safetensors.torch import save_file

    if cfg.method != "adapter":
        get_method(cfg.method).save(cfg, out, backbone, jobs[0].task, None)
        for j in jobs:
            d = out / "tasks" / j.name
            d.mkdir(parents=True, exist_ok=True)
            head = j.task.head_state()
            if head:
                with atomic_path(d / "head.safetensors") as tmp:
                    save_file(head, str(tmp))
            write_json(d / "task.json", j.task.metadata())
            write_text(d / "recipe.yaml", to_yaml(j.cfg))
        write_json(out / "metrics.json", result)
        return
    names = [j.name for j in jobs]
    sources = []
    for j in jobs:
        d = out / "adapters" / j.name
        meta = j.task.metadata()
        save_adapter(backbone, d, name=j.name, task=meta, extra={"sharing": cfg.sharing, "shared_with": names})
        head = j.task.head_state()
        if head:
            with atomic_path(d / "head.safetensors") as tmp:
                save_file(head, str(tmp))
        write_json(d / "task.json", meta)
        write_text(d / "recipe.yaml", to_yaml(j.cfg))
        sources.append((j.name, d))
    extra: dict[str, Any] = {"sharing": cfg.sharing}
    shared = tie_shared(backbone, names, cfg.sharing, check=False)
    if shared:
        with atomic_path(out / "shared.safetensors") as tmp:
            save_file({k: v.detach().cpu().contiguous().clone() for k, v in shared.items()}, str(tmp))
        extra["shared_parameters"] = {
            "file": "shared.safetensors",
            "tensors": len(shared),
            "numel": int(sum(v.numel() for v in shared.values())),
        }
    write_composition(out, "route", backbone, sources, extra=extra)
    write_json(out / "metrics.json", result)
