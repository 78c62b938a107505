"""Bottleneck vs cross-modal fusion adapters (attention and gating) on the embedded world, same budget.

Two measurements on the `photo` domain with the shipped tiny CLIP:
- VQA: accuracy overall and on relation yes/no questions (left/right/above/below/bigger);
- synthetic Winoground minimal pairs: text, image and group scores, overall and on the Relation subset
  (trained on minimal pairs from other seeds, evaluated on held-out pairs).
Prints one table per measurement with the adapters' parameter counts. All figures from this one run.

    python bench/fusion.py [--steps 150] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ADAPTERS = [
    ("bottleneck", {"variant": "bottleneck", "placement": "mlp", "reduction": 8}),
    ("fusion (attention)", {"variant": "fusion", "mechanism": "attention", "placement": "mlp", "reduction": 8}),
    ("fusion (gating)", {"variant": "fusion", "mechanism": "gating", "gate": "channel", "placement": "mlp",
                         "reduction": 8}),
]


def recipe(task: str, adapter: dict, steps: int, n_train: int, n_eval: int, method: str = "adapter") -> dict:
    data_task = "winoground" if task == "pairs" else task
    return {
        "name": f"{task}-{adapter['variant']}",
        "backbone": "tiny",
        "method": method,
        "adapter": adapter,
        "task": {"name": task},
        "data": {"train": {"kind": "world", "domain": "photo", "task": data_task, "n": n_train, "seed": 11},
                 "eval": {"kind": "world", "domain": "photo", "task": data_task, "n": n_eval, "seed": 9011}},
        "optim": {"lr": 2e-3, "steps": steps, "batch_size": 32, "warmup_steps": 10},
        "eval": {"every_steps": 0},
        "checkpoint": {"every_steps": 0},
        "logging": {"tensorboard": False, "plot": False},
        "seed": 0,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--n-train", type=int, default=1500)
    ap.add_argument("--n-eval", type=int, default=400)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    from rich.console import Console
    from rich.table import Table

    from vlkit.train.engine import train
    from vlkit.train.recipe import load_recipe

    console = Console(width=160)
    results: dict = {"vqa": [], "pairs": []}
    with tempfile.TemporaryDirectory() as tmp:
        for task in ("vqa", "pairs"):
            if task == "pairs":
                cfg = load_recipe(None, base=recipe(task, ADAPTERS[0][1], 1, args.n_train, args.n_eval, "zeroshot"))
                res = train(cfg, Path(tmp) / "zs", progress=False)
                results[task].append({"adapter": "none (frozen backbone)", "parameters": 0, **res["metrics"]})
            for label, adapter in ADAPTERS:
                cfg = load_recipe(None, base=recipe(task, adapter, args.steps, args.n_train, args.n_eval))
                res = train(cfg, Path(tmp) / f"{task}-{label}", progress=False)
                results[task].append({"adapter": label, "parameters": res["parameters"]["adapter"],
                                      "step_time_ms": res["step_time_ms"], **res["metrics"]})
                console.print(f"{task:>6} {label:<20} done")
    t = Table(title=f"photo VQA, {args.steps} steps x 32 ({args.n_train} train / {args.n_eval} eval)")
    for c in ("adapter", "parameters", "accuracy", "relation yes/no", "colour", "shape", "count", "step ms"):
        t.add_column(c)
    for r in results["vqa"]:
        t.add_row(r["adapter"], f"{r['parameters']:,}", f"{r['accuracy']:.1f}",
                  f"{r.get('accuracy_yesno_relation', float('nan')):.1f}", f"{r.get('accuracy_colour', float('nan')):.1f}",
                  f"{r.get('accuracy_shape', float('nan')):.1f}", f"{r.get('accuracy_count', float('nan')):.1f}",
                  f"{r['step_time_ms']:.0f}")
    console.print(t)
    t = Table(title=f"synthetic Winoground pairs (photo), trained {args.steps} steps on {args.n_train} pairs, "
                    f"{args.n_eval} held-out pairs; chance 25 / 25 / 16.7")
    for c in ("adapter", "parameters", "text", "image", "group", "text Rel.", "image Rel.", "group Rel.",
              "group Obj.", "group Both"):
        t.add_column(c)
    for r in results["pairs"]:
        g = lambda k: f"{r.get(k, float('nan')):.1f}"  # noqa: E731
        t.add_row(r["adapter"], f"{r['parameters']:,}", g("text_score"), g("image_score"), g("group_score"),
                  g("text_score_relation"), g("image_score_relation"), g("group_score_relation"),
                  g("group_score_object"), g("group_score_both"))
    console.print(t)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
