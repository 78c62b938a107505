"""Multi-task composition on one frozen backbone, on the embedded world: per task, its own adapter against a
merged adapter, the routed composition, the fused composition and the single shared adapter; plus the
cost of switching adapters and the memory of backbone + N adapters against N fully fine-tuned copies.

Tasks: medical classification, satellite VQA, sketch retrieval (recipes/multitask.yaml). Every figure
comes from this one run, with the same training budget for each adapter.

    python bench/compose.py [--steps 100] [--fuse-steps 40] [--n-train 384] [--n-eval 160] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ROOT = Path(__file__).resolve().parents[1]
TASKS = [("med-cls", "classification", "medical"), ("sat-vqa", "vqa", "satellite"),
         ("sketch-ret", "retrieval", "sketch")]


def own_recipe(name, task, domain, args) -> dict:
    return {"name": name, "backbone": args.backbone, "method": "adapter",
            "adapter": {"variant": "bottleneck", "reduction": 8, "towers": "both"},
            "task": {"name": task},
            "data": {"train": {"kind": "world", "domain": domain, "task": task, "n": args.n_train, "seed": 0},
                     "eval": {"kind": "world", "domain": domain, "task": task, "n": args.n_eval, "seed": 1000}},
            "optim": {"lr": 2e-3, "steps": args.steps, "batch_size": 32, "warmup_steps": 10, "schedule": "cosine"},
            "logging": {"tensorboard": False, "plot": False}, "seed": 0}


def evaluate(model, task, data) -> float:
    import torch

    with torch.no_grad():
        return task.evaluate(model, data)[task.metric]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbone", default="tiny")
    ap.add_argument("--steps", type=int, default=100, help="training steps per adapter (shared: 3x, one per task)")
    ap.add_argument("--fuse-steps", type=int, default=40)
    ap.add_argument("--n-train", type=int, default=384)
    ap.add_argument("--n-eval", type=int, default=160)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    import torch
    from rich.console import Console
    from rich.table import Table

    import vlkit
    from vlkit.compose import load_composition
    from vlkit.compose.api import compose
    from vlkit.compose.merge import merge_adapters
    from vlkit.compose.router import route
    from vlkit.data import load_data
    from vlkit.train.engine import run
    from vlkit.train.recipe import load_recipe

    torch.set_num_threads(args.threads)
    console = Console(stderr=True, width=150)
    t_start = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="vlkit-bench-compose-"))
    data, own, tasks, dirs = {}, {}, {}, {}
    # 1. one adapter per task (the same budget each)
    for name, task, domain in TASKS:
        r = own_recipe(name, task, domain, args)
        data[name] = (load_data(r["data"]["train"]), load_data(r["data"]["eval"]))
        res, _, tk = run(load_recipe(base=r), tmp / name, progress=False, datasets=data[name])
        own[name], tasks[name], dirs[name] = res["score"], tk, tmp / name
        console.print(f"own adapter {name}: {task} {tk.metric} {res['score']:.1f}  ({res['train_time_s']:.0f}s)")
    # 2. one shared adapter for all three tasks (multi-task recipe, sharing=shared, same total budget)
    mt = load_recipe(ROOT / "recipes" / "multitask.yaml",
                     [f"backbone={args.backbone}", "sharing=shared", f"optim.steps={3 * args.steps}"])
    res_mt, _, _ = run(mt, tmp / "shared", progress=False, datasets=data)
    shared = {n: res_mt["per_task"][n][res_mt["per_task"][n]["metric"]] for n, _, _ in TASKS}
    console.print(f"shared adapter: {res_mt['train_time_s']:.0f}s")
    # 3. merged adapters (weight space: linear average and TIES)
    srcs = [dirs[n] for n, _, _ in TASKS]
    merge_adapters(srcs, tmp / "merged-linear", method="linear")
    merge_adapters(srcs, tmp / "merged-ties", method="ties", density=0.3)
    # 4. routed composition: router trained on the adapters' own training data
    rres = compose([str(d) for d in srcs], "route", tmp / "routed", n_per_adapter=args.n_train // 2,
                   router_steps=300)
    console.print(f"router held-out accuracy {rres['routing']['heldout_accuracy']:.1f}%")
    # 5. fused composition per task (AdapterFusion over the three frozen adapters)
    fused = {}
    for name, task, domain in TASKS:
        base = {"name": f"fuse-{name}", "backbone": args.backbone, "method": "fuse",
                "compose": {"adapters": [{"name": n, "path": str(dirs[n])} for n, _, _ in TASKS]},
                "logging": {"tensorboard": False, "plot": False}}
        cfg = load_recipe(ROOT / "recipes" / "fuse.yaml", [f"task.name={task}", f"optim.steps={args.fuse_steps}",
                                                           "optim.lr=1e-2"], base=base)
        res, _, _ = run(cfg, tmp / f"fused-{name}", progress=False, datasets=data[name])
        fused[name] = res["score"]
        console.print(f"fused for {name}: {res['score']:.1f} ({res['train_time_s']:.0f}s)")
    # evaluate everything on one backbone holding all adapters
    bb = vlkit.load_backbone(args.backbone).eval()
    n_base = sum(p.numel() for p in bb.parameters())
    for n, _, _ in TASKS:
        vlkit.load_adapter(bb, dirs[n], name=n, activate=False)
    n_with = sum(p.numel() for p in bb.parameters())
    vlkit.load_adapter(bb, tmp / "merged-linear", name="merged_linear", activate=False)
    vlkit.load_adapter(bb, tmp / "merged-ties", name="merged_ties", activate=False)
    comp = load_composition(bb, tmp / "routed", activate=False)
    routed_view = comp.routed(bb)
    from vlkit.data.pipeline import materialize

    prepared = {n: materialize(tasks[n].prepare(bb, data[n][1])) for n, _, _ in TASKS}
    rows = {}
    for i, (name, task, domain) in enumerate(TASKS):
        tk, d = tasks[name], prepared[name]
        bb.set_active()
        frozen = evaluate(bb, tk, d)
        bb.set_active(name)
        mine = evaluate(bb, tk, d)
        bb.set_active("merged_linear")
        m_lin = evaluate(bb, tk, d)
        bb.set_active("merged_ties")
        m_ties = evaluate(bb, tk, d)
        comp.activate(bb)
        routed = evaluate(routed_view, tk, d)
        idx = route(bb, comp.router, d["pixels"], d.get("tokens"))
        acc = 100.0 * float((idx == i).float().mean())  # the router's names follow TASKS
        rows[name] = {"task": f"{domain} {task}", "metric": tk.metric, "frozen": frozen, "own": mine,
                      "merged_linear": m_lin, "merged_ties": m_ties, "routed": routed, "routing_acc": acc,
                      "fused": fused[name], "shared": shared[name]}
    # switching cost and memory
    names = [n for n, _, _ in TASKS]
    times = []
    for k in range(20000):
        t0 = time.perf_counter()
        bb.set_active(names[k % 3])
        times.append(time.perf_counter() - t0)
    switch_us = 1e6 * statistics.median(times)
    switch_max_us = 1e6 * sorted(times)[int(0.999 * len(times))]
    pixels = prepared["med-cls"]["pixels"][:8]
    bb.set_active("med-cls")
    with torch.no_grad():
        before = bb.encode_image(pixels)
        bb.set_active("sat-vqa")
        bb.encode_image(pixels)
        bb.set_active("med-cls")
        exact = bool(torch.equal(before, bb.encode_image(pixels)))
    bytes_per = 4
    adapters_n = n_with - n_base
    mem = {"backbone_mb": n_base * bytes_per / 2**20, "adapters_mb": adapters_n * bytes_per / 2**20,
           "composed_mb": n_with * bytes_per / 2**20, "finetuned_copies_mb": 3 * n_base * bytes_per / 2**20}

    t = Table(title=f"composition on one frozen {args.backbone} backbone — score per task "
                    f"({args.steps} steps per adapter, {args.n_eval} eval examples)")
    for c in ("task", "metric", "frozen", "own adapter", "merged (linear)", "merged (TIES)", "routed", "fused",
              "shared (1 adapter)"):
        t.add_column(c, justify="right" if c not in ("task", "metric") else "left")
    for r in rows.values():
        t.add_row(r["task"], r["metric"], *[f"{r[k]:.1f}" for k in ("frozen", "own", "merged_linear", "merged_ties",
                                                                   "routed", "fused", "shared")])
    mean = {k: statistics.mean(r[k] for r in rows.values()) for k in ("frozen", "own", "merged_linear", "merged_ties",
                                                                      "routed", "fused", "shared")}
    t.add_row("mean", "", *[f"{mean[k]:.1f}" for k in mean])
    console.print(t)
    rt = Table(title="router (trained on the adapters' own training data; no task labels at inference)")
    rt.add_column("inputs")
    rt.add_column("routed to the right adapter", justify="right")
    rt.add_row("held out from router training", f"{rres['routing']['heldout_accuracy']:.1f}% (chance "
                                                  f"{rres['routing']['chance']:.1f}%)")
    for r in rows.values():
        rt.add_row(f"eval set: {r['task']}", f"{r['routing_acc']:.1f}%")
    console.print(rt)
    ct = Table(title="one backbone + 3 adapters vs 3 fully fine-tuned copies (fp32 parameters)")
    ct.add_column("")
    ct.add_column("value", justify="right")
    ct.add_row("switch adapters (set_active), median / p99.9", f"{switch_us:.1f} µs / {switch_max_us:.1f} µs "
                                                               f"({'≤' if switch_max_us < 1000 else '>'} 1 ms)")
    ct.add_row("switching exact (a, then b, then a again)", "yes" if exact else "NO")
    ct.add_row("backbone", f"{n_base:,} params, {mem['backbone_mb']:.2f} MB")
    ct.add_row("+ 3 adapters", f"{adapters_n:,} params, {mem['adapters_mb']:.2f} MB "
                                f"({100.0 * adapters_n / n_base:.1f}% of the backbone)")
    ct.add_row("backbone + 3 adapters", f"{mem['composed_mb']:.2f} MB")
    ct.add_row("3 fine-tuned copies", f"{mem['finetuned_copies_mb']:.2f} MB "
                                      f"({mem['finetuned_copies_mb'] / mem['composed_mb']:.2f}x)")
    console.print(ct)
    total_s = time.perf_counter() - t_start
    console.print(f"total {total_s:.0f}s; files in {tmp}")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "mean": mean, "routing": rres["routing"],
                                               "switch_us_median": switch_us, "switch_us_p999": switch_max_us,
                                               "switch_exact": exact, "memory": mem, "total_s": total_s}, indent=2))


if __name__ == "__main__":
    main()
