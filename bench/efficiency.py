"""Adapter efficiency on the embedded world (medical domain): zero-shot, linear probe, bottleneck, LoRA,
(IA)^3 and full fine-tuning with the same budget, per task (classification and vqa).

Classification uses a trainable linear head initialised from the class-prompt (zero-shot) weights for
every method, so all methods train the same head; the linear probe trains only that head. A linear head
reads only the image embedding, so for classification the adapters go into the vision tower (text-tower
adapters would be parameters that cannot change the score); VQA adapts both towers. Every method that
trains a head trains it at `--head-lr` (the rest at the method's own learning rate). Trainable % counts
the task head, in the numerator and the denominator.
Prints per method: trainable %, score, score as % of full fine-tuning, training step time and peak
training-step memory relative to full fine-tuning. All figures come from this one run.

Scores are the mean over `--seeds` (each seed draws its own train/eval sets and initialisation), with the
sample standard deviation when there are several.

    python bench/efficiency.py [--steps 300] [--tasks classification,vqa] [--seeds 0,1,2] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def recipe(task: str, method: str, variant: str | None, steps: int, n_train: int, n_eval: int, seed: int,
           head_lr: float | None = 3e-2) -> dict:
    lr = {"linear-sgd": 3e-2, "zeroshot": 1e-3}.get(method, 3e-3)
    if method == "full":  # best of 2e-4, 5e-4, 1e-3, 2e-3 (classification) and 5e-5, 1e-4, 2e-4, 5e-4, 1e-3 (vqa)
        lr = 1e-3 if task == "classification" else 1e-4
    towers = "vision" if task == "classification" else "both"
    adapter = {"variant": variant or "bottleneck", "towers": towers}
    if method == "adapter" and variant == "bottleneck":
        # layers before attention and MLP and on the embeddings: on medical, best of the output / input
        # positions with and without `embed`; classification lr best of 3e-3, 5e-3, 1e-2, 2e-2
        adapter.update(attn_position="input", mlp_position="input", embed=True)
        adapter["reduction"] = 4 if task == "classification" else 12  # vqa adapts both towers: 12 keeps it < 5%
        if task == "classification":
            lr = 5e-3
    if variant == "lora":
        rank = 8 if towers == "vision" else 3  # under 5% trainable with the head either way
        adapter.update(rank=rank, alpha=2 * rank, modules="all")
    if variant == "ia3":
        adapter.update(modules="attn_mlp")
        lr = 3e-2
    return {
        "name": f"{task}-{variant or method}",
        "backbone": "tiny",
        "method": method,
        "adapter": adapter,
        "task": {"name": task, "options": {"head": "linear"} if task == "classification" else {}},
        "data": {"train": {"kind": "world", "domain": "medical", "task": task, "n": n_train, "seed": seed},
                 "eval": {"kind": "world", "domain": "medical", "task": task, "n": n_eval, "seed": seed + 5000}},
        "optim": {"lr": lr, "head_lr": head_lr, "steps": steps, "batch_size": 64, "warmup_steps": 10, "schedule": "cosine",
                  "weight_decay": 0.0},
        "eval": {"every_steps": 0},
        "checkpoint": {"every_steps": 0},
        "logging": {"tensorboard": False, "plot": False},
        "seed": seed,
    }


METHODS = [("zero-shot", "zeroshot", None), ("linear probe", "linear-sgd", None), ("bottleneck", "adapter", "bottleneck"),
           ("LoRA", "adapter", "lora"), ("(IA)^3", "adapter", "ia3"), ("full fine-tuning", "full", None)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--n-train", type=int, default=3000)
    ap.add_argument("--n-eval", type=int, default=2000)
    ap.add_argument("--tasks", default="classification,vqa")
    ap.add_argument("--seeds", default="0", help="comma-separated seeds; scores are the mean (± sample sd) over them")
    ap.add_argument("--head-lr", type=float, default=3e-2, help="learning rate of every trained task head")
    ap.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = ap.parse_args()

    from rich.console import Console
    from rich.table import Table

    from vlkit.plugins import registry
    from vlkit.train.engine import train
    from vlkit.train.memory import measure_step_memory
    from vlkit.train.recipe import load_recipe

    seeds = [int(x) for x in args.seeds.split(",")]
    console = Console(width=160)
    results = {}
    for task in args.tasks.split(","):
        rows = []
        for label, method, variant in METHODS:
            if variant and variant not in registry("adapter"):
                console.print(f"[yellow]skip {label}: variant {variant!r} not installed[/]")
                continue
            if method == "linear-sgd" and task == "retrieval":
                continue
            scores, times = [], []
            for seed in seeds:
                cfg = load_recipe(None, base=recipe(task, method, variant, args.steps, args.n_train, args.n_eval, seed,
                                                  args.head_lr))
                with tempfile.TemporaryDirectory() as tmp:
                    res = train(cfg, Path(tmp) / "run", progress=False)
                scores.append(res["score"])
                times.append(res["step_time_ms"])
                console.print(f"{task:>14} {label:<18} seed {seed} score {res['score']:.2f}")
            mem = measure_step_memory(cfg) if method != "zeroshot" else None
            rows.append({"method": label, "trainable_percent": res["parameters"]["trainable_percent"],
                         "score": statistics.fmean(scores), "scores": scores,
                         "score_sd": statistics.stdev(scores) if len(scores) > 1 else None,
                         "step_time_ms": statistics.fmean(times) if times[0] else None,
                         "memory_bytes": mem["total"] if mem else None, "memory": mem})
        full = next(r for r in rows if r["method"] == "full fine-tuning")
        t = Table(title=f"medical {task}: {args.steps} steps, batch 64, {args.n_train} train / {args.n_eval} eval, "
                        f"seed{'s' if len(seeds) > 1 else ''} {args.seeds}")
        for c in ("method", "trainable %", "score", "% of full FT", "step time vs full", "peak memory vs full"):
            t.add_column(c)
        for r in rows:
            r["score_vs_full"] = 100.0 * r["score"] / full["score"] if full["score"] else None
            r["time_vs_full"] = r["step_time_ms"] / full["step_time_ms"] if r["step_time_ms"] else None
            r["memory_vs_full"] = r["memory_bytes"] / full["memory_bytes"] if r["memory_bytes"] else None
            sd = f" ± {r['score_sd']:.2f}" if r["score_sd"] is not None else ""
            t.add_row(r["method"], f"{r['trainable_percent']:.2f}", f"{r['score']:.2f}{sd}",
                      f"{r['score_vs_full']:.1f}%", "—" if r["time_vs_full"] is None else f"{r['time_vs_full']:.2f}x",
                      "—" if r["memory_vs_full"] is None else f"{r['memory_vs_full']:.2f}x")
        console.print(t)
        results[task] = rows
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
    main()
