"""Real data at real scale: memory, time to first step, loader speed and the feature cache, in one run.

    python bench/scale.py                       # 1k and 20k images, ViT-B-32 (random init), 224 px, CPU
    python bench/scale.py --sizes 500,2000 --steps 2

Generates smooth random 224 px JPEG images with captions once (under --data, reused), as a JSONL manifest
and as webdataset tar shards of the same bytes. Each training run is its own process, so its peak RSS is
its own: the main process (ru_maxrss) and, separately, the largest DataLoader worker. Columns:

- peak RSS / time to first step for the streaming pipeline on manifests and shards of each size, and for
  the previous pipeline (every image decoded into one tensor before the first step; emulated by
  materialising the lazy column) on the sizes where it still fits (`--before-sizes`);
- loader-only images/s (2 workers) against training-step images/s;
- the frozen-tower feature cache: epoch time after the first, cache off / on, for a vision-only adapter
  (the text tower is cached) and for a linear probe (the whole vision tower is cached).

Results are ratios measured in this run; the table goes to stdout as markdown.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BACKBONE = "open_clip:ViT-B-32"
WORDS = ["red", "blue", "green", "small", "large", "circle", "square", "field", "river", "road", "city", "forest"]


def make_images(root: Path, n: int, size: int = 224, shard_size: int = 1000) -> dict[str, str]:
    """n JPEGs + captions as manifest.jsonl and webdataset shards (same bytes); cached under root/n."""
    import io

    import numpy as np
    from PIL import Image

    d = root / str(n)
    manifest, shards = d / "manifest.jsonl", d / "shards"
    n_shards = (n + shard_size - 1) // shard_size
    pattern = str(shards / f"shard-{{0000..{n_shards - 1:04d}}}.tar")
    if (d / "done").is_file():
        return {"manifest": str(manifest), "shards": pattern}
    (d / "images").mkdir(parents=True, exist_ok=True)
    shards.mkdir(exist_ok=True)
    rng = np.random.default_rng(n)
    rows = []
    tar = None
    for i in range(n):
        if i % shard_size == 0:
            if tar is not None:
                tar.close()
            tar = tarfile.open(shards / f"shard-{i // shard_size:04d}.tar", "w")
        low = (rng.random((6, 6, 3)) * 255).astype("uint8")
        im = Image.fromarray(low).resize((size + 32 * (i % 3), size), Image.BICUBIC)
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=85)
        data = buf.getvalue()
        (d / "images" / f"{i:06d}.jpg").write_bytes(data)
        caption = " ".join(rng.choice(WORDS, 4))
        rows.append(json.dumps({"image": f"images/{i:06d}.jpg", "caption": caption}))
        for ext, blob in (("jpg", data), ("txt", caption.encode())):
            info = tarfile.TarInfo(f"{i:06d}.{ext}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    tar.close()
    manifest.write_text("\n".join(rows) + "\n")
    (d / "done").write_text("")
    return {"manifest": str(manifest), "shards": pattern}


def recipe(data: dict, steps: int, batch: int, workers: int, extra: dict | None = None) -> dict:
    r = {"name": "scale", "backbone": BACKBONE, "method": "adapter",
         "adapter": {"variant": "lora", "rank": 8, "modules": "all"}, "task": {"name": "retrieval"},
         "data": {"train": data, "num_workers": workers},
         "optim": {"lr": 1e-4, "steps": steps, "batch_size": batch, "warmup_steps": 0},
         "device": "cpu", "precision": "fp32", "eval": {"every_steps": 0},
         "checkpoint": {"every_steps": 0}, "logging": {"tensorboard": False, "plot": False, "every_steps": 1}}
    for k, v in (extra or {}).items():
        node = r
        *path, leaf = k.split(".")
        for p in path:
            node = node.setdefault(p, {})
        node[leaf] = v
    return r


def _rss_mb(who) -> float:
    return resource.getrusage(who).ru_maxrss / 1024.0


def child_train(spec: dict) -> dict:
    """One training run in this process: time to first step, step rate, peak RSS."""
    t0 = time.perf_counter()
    import torch

    from vlkit.train.engine import run
    from vlkit.train.recipe import load_recipe

    torch.set_num_threads(int(spec.get("threads", 2)))
    if spec.get("before"):
        _use_previous_pipeline()
    stamps = []

    def progress(event, **info):
        if event == "step":
            stamps.append(time.perf_counter())

    cfg = load_recipe(base=spec["recipe"])
    res, _, _ = run(cfg, spec["out"], progress=progress)
    steps = res["steps"]
    rate = (len(stamps) - 1) * cfg.optim.batch_size / (stamps[-1] - stamps[0]) if len(stamps) > 1 else None
    return {"first_step_s": stamps[0] - t0 if stamps else None, "train_images_per_s": rate, "steps": steps,
            "rss_mb": _rss_mb(resource.RUSAGE_SELF), "worker_rss_mb": _rss_mb(resource.RUSAGE_CHILDREN)}


def _use_previous_pipeline() -> None:
    """The pipeline before streaming: every image of the column decoded into one tensor at prepare time."""
    import vlkit.tasks.base as base
    import vlkit.tasks.classification as cls
    import vlkit.tasks.retrieval as ret

    lazy = base.prepare_pixels

    def prepare_all(backbone, ds, column="image"):
        return lazy(backbone, ds, column).materialize()

    for mod in (base, cls, ret):
        mod.prepare_pixels = prepare_all


def child_loader(spec: dict) -> dict:
    """Loader-only images/s: the training DataLoader alone, `workers` processes, no model step."""
    import torch

    from vlkit.backbones.loading import load_backbone
    from vlkit.data import load_data
    from vlkit.data.pipeline import SeededBatches, configure, make_loader
    from vlkit.plugins import registry

    torch.set_num_threads(2)
    bb = load_backbone(BACKBONE)
    ds = load_data({**spec["data"], "task": "retrieval"})
    task = registry("task").get("retrieval")(bb, ds)
    data = task.prepare(bb, ds)
    configure(data, num_workers=spec["workers"])
    it = iter(make_loader(data, SeededBatches(len(ds), spec["batch"], 0), train=True))
    next(it)
    t = time.perf_counter()
    n = 0
    for _ in range(spec["batches"]):
        n += len(next(it)["pixels"])
    return {"loader_images_per_s": n / (time.perf_counter() - t)}


def child_cache(spec: dict) -> dict:
    """Epoch time after the first with the feature cache on or off (epochs 2.. of a 3-epoch run)."""
    import torch

    from vlkit.train.engine import run
    from vlkit.train.recipe import load_recipe

    torch.set_num_threads(2)
    stamps = []

    def progress(event, **info):
        if event == "step":
            stamps.append(time.perf_counter())

    cfg = load_recipe(base=spec["recipe"])
    run(cfg, spec["out"], progress=progress)
    per_epoch = spec["steps_per_epoch"]
    later = stamps[per_epoch - 1:]
    return {"epoch_s": (later[-1] - later[0]) / ((len(later) - 1) / per_epoch)}


def spawn(kind: str, spec: dict) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, __file__, "--child", kind, json.dumps(spec)], capture_output=True,
                       text=True, env=env)
    if r.returncode != 0:
        return {"error": (r.stderr.strip().splitlines() or ["failed"])[-1][:200]}
    return json.loads(r.stdout.strip().splitlines()[-1])


def fmt(v, unit="") -> str:
    if v is None:
        return "-"
    return f"{v:,.1f}{unit}" if isinstance(v, float) else str(v)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1000,20000")
    ap.add_argument("--before-sizes", default="1000,5000",
                    help="sizes for the previous (all-in-RAM) pipeline; 20k would hold ~12 GB of pixels")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--data", default=str(ROOT / "runs" / "scale-data"))
    ap.add_argument("--cache-images", type=int, default=96)
    ap.add_argument("--child", nargs=2, metavar=("KIND", "SPEC"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        fn = {"train": child_train, "loader": child_loader, "cache": child_cache}[args.child[0]]
        print(json.dumps(fn(json.loads(args.child[1]))))
        return
    sizes = [int(s) for s in args.sizes.split(",")]
    before_sizes = [int(s) for s in args.before_sizes.split(",") if s]
    root = Path(args.data)
    out = root / "runs"
    files = {n: make_images(root, n) for n in sorted(set(sizes + before_sizes + [args.cache_images]))}
    rows = {}
    for n in sizes:
        for src in ("manifest", "webdataset"):
            data = ({"kind": "manifest", "path": files[n]["manifest"]} if src == "manifest"
                    else {"kind": "webdataset", "shards": files[n]["shards"]})
            rows[(src, n)] = spawn("train", {"recipe": recipe(data, args.steps, args.batch, args.workers),
                                             "out": str(out / f"{src}-{n}")})
            print(f"{src} {n}: {rows[(src, n)]}", file=sys.stderr)
    for n in before_sizes:
        data = {"kind": "manifest", "path": files[n]["manifest"]}
        rows[("before", n)] = spawn("train", {"recipe": recipe(data, args.steps, args.batch, 0),
                                              "out": str(out / f"before-{n}"), "before": True})
        print(f"before {n}: {rows[('before', n)]}", file=sys.stderr)
    big = max(sizes)
    loader = {w: spawn("loader", {"data": {"kind": "manifest", "path": files[big]["manifest"]}, "workers": w,
                                  "batch": args.batch, "batches": 12}) for w in (0, args.workers)}
    print(f"loader: {loader}", file=sys.stderr)
    cache_rows = {}
    n_c = args.cache_images
    spe = n_c // args.batch
    for case, extra in (("vision-only LoRA (text tower cached)", {"adapter.towers": "vision"}),
                        ("linear probe (vision tower cached)", {"method": "linear-sgd"})):  # the SGD head
        for flag in (False, True):
            data = {"kind": "manifest", "path": files[n_c]["manifest"]}
            task = {"task": {"name": "classification", "options": {"head": "linear", "class_names": WORDS[:2]}}} \
                if case.startswith("linear") else {}
            r = recipe(data, 3 * spe, args.batch, args.workers, {**extra, "data.feature_cache": flag})
            r.update(task)
            if task:
                r["data"]["train"] = {"kind": "manifest", "path": _labelled(files[n_c]["manifest"])}
            cache_rows[(case, flag)] = spawn("cache", {"recipe": r, "out": str(out / f"cache-{flag}"),
                                                       "steps_per_epoch": spe})
            print(f"cache {case} {flag}: {cache_rows[(case, flag)]}", file=sys.stderr)
    print(table(rows, sizes, before_sizes, loader, cache_rows, args))


def _labelled(manifest: str) -> str:
    """The manifest with a label column (first caption word in a two-class set) for the linear probe."""
    p = Path(manifest).with_name("labelled.jsonl")
    if not p.is_file():
        rows = [json.loads(x) for x in Path(manifest).read_text().splitlines() if x.strip()]
        p.write_text("".join(json.dumps({**r, "label": WORDS[i % 2]}) + "\n" for i, r in enumerate(rows)))
    return str(p)


def table(rows, sizes, before_sizes, loader, cache_rows, args) -> str:
    lo, hi = min(sizes), max(sizes)
    lines = [f"## bench/scale.py — {BACKBONE} (random init), 224 px, CPU, batch {args.batch}, "
             f"{args.workers} workers, {args.steps} steps", "",
             "| pipeline | source | images | peak RSS main | peak RSS worker | time to first step | train images/s |",
             "|---|---|---|---|---|---|---|"]
    for (src, n), r in sorted(rows.items(), key=lambda kv: (kv[0][0] == "before", kv[0][0], kv[0][1])):
        pipe = "previous (all in RAM)" if src == "before" else "streaming"
        source = "manifest" if src == "before" else src
        if "error" in r:
            lines.append(f"| {pipe} | {source} | {n:,} | failed: {r['error']} | | | |")
            continue
        lines.append(f"| {pipe} | {source} | {n:,} | {fmt(r['rss_mb'], ' MB')} | {fmt(r['worker_rss_mb'], ' MB')} "
                     f"| {fmt(r['first_step_s'], ' s')} | {fmt(r['train_images_per_s'])} |")
    lines += ["", "| ratio | measured | goal |", "|---|---|---|"]
    for src in ("manifest", "webdataset"):
        a, b = rows.get((src, lo), {}), rows.get((src, hi), {})
        if "rss_mb" in a and "rss_mb" in b:
            lines.append(f"| {src}: peak RSS {hi:,} / {lo:,} | {b['rss_mb'] / a['rss_mb']:.2f}x "
                         f"({b['rss_mb'] / 1024:.2f} GB) | <= 1.2x, < 3 GB |")
            lines.append(f"| {src}: time to first step {hi:,} / {lo:,} | {b['first_step_s'] / a['first_step_s']:.2f}x "
                         f"| <= 1.5x |")
    bl, bh = rows.get(("before", min(before_sizes or [0])), {}), rows.get(("before", max(before_sizes or [0])), {})
    if "rss_mb" in bl and "rss_mb" in bh and bl is not bh:
        lines.append(f"| previous: peak RSS {max(before_sizes):,} / {min(before_sizes):,} | "
                     f"{bh['rss_mb'] / bl['rss_mb']:.2f}x | (before) |")
        lines.append(f"| previous: time to first step {max(before_sizes):,} / {min(before_sizes):,} | "
                     f"{bh['first_step_s'] / bl['first_step_s']:.2f}x | (before) |")
    train_rate = rows.get(("manifest", hi), {}).get("train_images_per_s")
    lw = loader.get(args.workers, {}).get("loader_images_per_s")
    l0 = loader.get(0, {}).get("loader_images_per_s")
    if train_rate and lw:
        lines.append(f"| loader ({args.workers} workers) / training step images/s | {lw / train_rate:.1f}x "
                     f"({lw:.0f} vs {train_rate:.1f}; 0 workers: {fmt(l0)}) | >= 2x |")
    for case in dict.fromkeys(c for c, _ in cache_rows):
        off, on = cache_rows.get((case, False), {}), cache_rows.get((case, True), {})
        if "epoch_s" in off and "epoch_s" in on:
            lines.append(f"| feature cache, {case}: epoch after the first, off / on | "
                         f"{off['epoch_s'] / on['epoch_s']:.2f}x ({off['epoch_s']:.1f} s vs {on['epoch_s']:.1f} s) "
                         f"| >= 2x |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
