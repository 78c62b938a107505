"""The plan step: any recipe (single-task, multi-task with `tasks:`, AdapterFusion with `method: fuse`) becomes a
list of jobs, each built by its method's `prepare` (`vlkit.train.jobs.prepare_job`), and the parameters that
train. The engine only loops over the jobs; the plan also says how the run's result and files are written.

- single task (any method: adapter, full, linear, linear-sgd, zeroshot, fuse, a plugin's): one job; the method writes
  its files (`TrainingMethod.save`), with task.json, head.safetensors, metrics.json and the curves;
- multi-task (`vlkit.train.multitask`): one job per task, run round-robin, each task's adapter prepared as
  its single-task recipe would be, tied per `sharing`; writes a route composition of the task adapters.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from ..io import atomic_path, write_json
from .jobs import Job, prepare_job
from .logs import plot_curves
from .methods import freeze, get_method, trainable_parameters
from .multitask import multitask_jobs, multitask_result, write_multitask_outputs
from .recipe import plain


def job_count(cfg) -> int:
    """How many jobs `build_plan` makes of `cfg`, known before any weights or data load."""
    return max(1, len(cfg.tasks))


class Plan:
    """A single-task recipe's one job and trainable parameters; `finish` and `write` fill and write its result."""

    def __init__(self, cfg, jobs: list[Job], trainable: dict[str, nn.Parameter]):
        self.cfg = cfg
        self.jobs = jobs
        self.trainable = trainable

    @property
    def label(self) -> str:
        """The result's `task`: the task's name."""
        return self.jobs[0].task.name

    def finish(self, result: dict[str, Any], per_task: dict[str | None, dict]) -> None:
        """Fill the result from the evaluation of each job ({job name: metrics with `task` and `metric`})."""
        task = self.jobs[0].task
        final = {k: v for k, v in per_task.get(self.jobs[0].name, {}).items() if k not in ("task", "metric")}
        result.update({"metrics": final, "primary_metric": task.metric, "score": final.get(task.metric)})

    def write(self, out: Path, backbone, result: dict[str, Any], history: list[dict[str, Any]]) -> None:
        """The method's files, head.safetensors, task.json, metrics.json and the training curves, into `out`."""
        from safetensors.torch import save_file

        job = self.jobs[0]
        task = job.task
        meta = task.metadata()
        get_method(self.cfg.method).save(self.cfg, Path(out), backbone, task, job.adapter)
        if job.adapter is not None:
            result["adapter"] = job.adapter
        head = task.head_state()
        if head:
            with atomic_path(out / "head.safetensors") as tmp:
                save_file(head, str(tmp))
        write_json(out / "task.json", meta)
        write_json(out / "metrics.json", result)
        if self.cfg.logging.plot and history:
            plot_curves(history, out / "training_curves.png", task.metric)
        result["files"] = sorted(p.name for p in Path(out).iterdir() if p.is_file())

    def tasks(self):
        """What `engine.run` returns as its third item: the task."""
        return self.jobs[0].task


class MultiTaskPlan(Plan):
    """A multi-task recipe's jobs (one per task, one adapter each) and their shared trainable parameters."""

    @property
    def label(self) -> str:
        return "multitask"

    def finish(self, result: dict[str, Any], per_task: dict[str | None, dict]) -> None:
        multitask_result(result, self.cfg, per_task)

    def write(self, out: Path, backbone, result: dict[str, Any], history: list[dict[str, Any]]) -> None:
        write_multitask_outputs(self.cfg, out, backbone, self.jobs, result)

    def tasks(self):
        """{adapter name: task}."""
        return {j.name: j.task for j in self.jobs}


def build_plan(cfg, backbone, datasets: tuple | dict | None = None) -> Plan:
    """The jobs of recipe `cfg` on `backbone`, every adapter made by the recipe's method `prepare`.

    `datasets`: for a single task (train, eval or None); for a multi-task recipe {adapter name: (train, eval)};
    None: each task's `data`."""

    if cfg.tasks:
        jobs, trainable = multitask_jobs(cfg, backbone, dict(datasets or {}))
        return MultiTaskPlan(cfg, jobs, trainable)
    freeze(backbone)
    method = get_method(cfg.method)
    assert not isinstance(datasets, dict), "one task: (train, eval) or None"
    job = prepare_job(
        backbone, cfg, name=None, seed=cfg.seed, method=method, datasets=datasets, adapter_options=plain(cfg.adapter)
    )
    return Plan(cfg, [job], trainable_parameters(backbone, {"head.": job.task.head}))
