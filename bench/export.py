"""Inference latency of an exported adapter: PyTorch eager vs onnxruntime, and the adapter's overhead.

For each adapter variant and batch size, the median latency of one encoder forward pass (image encoder by
default) for: PyTorch eager with the frozen backbone, PyTorch eager with the adapter (as vlkit runs it:
unmerged), onnxruntime fp32 of the frozen backbone and of the adapted model, and onnxruntime int8
(dynamic quantisation) of the adapted model. The ONNX graphs are made by `vlkit.export.export_model`,
so they are the verified graphs `vlkit export` writes. PyTorch and onnxruntime use the same thread count.

Ratios: `ort/eager` = onnxruntime fp32 (adapter) / PyTorch eager (adapter), target <= 1;
`+eager` / `+ort` = the adapter's added latency over the frozen backbone in the same runtime (target
<= 10%), with the added milliseconds per forward pass (the seed quotes 50-100 ms).

    python bench/export.py [--adapters bottleneck,lora] [--batches 1,8,32] [--threads 2] [--tower image]
                           [--big] [--json out.json]

`--big` also runs open_clip ViT-B-32 (random init; no download).
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

import numpy as np  # noqa: E402
import torch  # noqa: E402


def median_ms(fns: dict, repeats: int, warmup: int = 3, budget_s: float = 20.0) -> dict[str, float]:
    """Median ms per call of each function, measured round-robin (one call of each per round) so that
    load from other processes on the machine falls on all of them alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    start = time.perf_counter()
    for _ in range(repeats):
        for k, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[k].append(1000.0 * (time.perf_counter() - t))
        if time.perf_counter() - start > budget_s and len(times[k]) >= 5:
            break
    return {k: statistics.median(v) for k, v in times.items()}


def make_adapter(spec: str, variant: str, path: Path, seed: int = 0) -> Path:
    """An adapter with non-trivial weights (perturbed from its identity init), saved to `path`."""
    import vlkit
    from vlkit.adapters.inject import adapter_layers

    bb = vlkit.load_backbone(spec)
    opts = {"rank": 8, "modules": "all"} if variant == "lora" else {}
    vlkit.inject(bb, variant, name=variant, **opts)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in adapter_layers(bb, variant).values():
            for p in layer.parameters():
                p.add_(0.02 * torch.randn(p.shape, generator=g))
    vlkit.save_adapter(bb, path, name=variant)
    return path


def session(path: Path, threads: int):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def bench_backbone(spec: str, variants: list[str], batches: list[int], threads: int, tower: str, repeats: int,
                   work: Path) -> list[dict]:
    import vlkit
    from vlkit.export.api import export_model
    from vlkit.export.base import ExportOptions

    graph = "image_encoder" if tower == "image" else "text_encoder"
    in_name = "pixel_values" if tower == "image" else "input_ids"
    frozen_dir = work / "frozen"
    export_model(frozen_dir, backbone=spec, eval_n=16, options=ExportOptions(seed=0))
    frozen_bb = vlkit.load_backbone(spec)
    rows = []
    for variant in variants:
        adir = make_adapter(spec, variant, work / f"adapter-{variant}")
        out = work / f"onnx-{variant}"
        summary = export_model(out, adapters=[adir], eval_n=16, options=ExportOptions(quantize="int8", seed=0))
        adapted = vlkit.load_backbone(spec)
        vlkit.load_adapter(adapted, adir)
        sessions = {"ort_frozen": session(frozen_dir / f"{graph}.onnx", threads),
                    "ort_fp32": session(out / f"{graph}.onnx", threads),
                    "ort_int8": session(out / f"{graph}.int8.onnx", threads)}
        for b in batches:
            if tower == "image":
                x = torch.randn(b, 3, frozen_bb.image_size, frozen_bb.image_size)
            else:
                x = frozen_bb.tokenize([f"a photo of {i} small red cubes left of a blue ball" for i in range(b)])
            xn = {in_name: x.numpy()}

            def eager(bb):
                enc = bb.encode_image if tower == "image" else bb.encode_text
                return lambda: enc(x, normalize=True)

            fns = {"eager_frozen": eager(frozen_bb), "eager_adapter": eager(adapted)}
            fns.update({k: (lambda s=sess: s.run(None, xn)) for k, sess in sessions.items()})
            with torch.inference_mode():
                r = {"backbone": spec, "variant": variant, "batch": b, **median_ms(fns, repeats)}
            r["merged"] = bool(summary["merged"])
            r["max_abs_diff_fp32"] = summary["max_abs_diff"]["fp32"]
            rows.append(r)
            print(f"  {variant:10s} batch {b:3d}: eager {r['eager_adapter']:.2f} ms, ort {r['ort_fp32']:.2f} ms",
                  file=sys.stderr)
    return rows


def render(rows: list[dict], threads: int, tower: str) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"{tower} encoder latency, median ms per batch ({threads} thread(s), CPU)")
    for c in ("backbone", "adapter", "batch", "eager frozen", "eager +adapter", "ort frozen", "ort fp32 +adapter",
              "ort int8 +adapter", "ort/eager", "+% eager", "+% ort", "+ms eager", "+ms ort"):
        t.add_column(c, justify="right" if c not in ("backbone", "adapter") else "left", no_wrap=True)
    for r in rows:
        over_e = 100.0 * (r["eager_adapter"] / r["eager_frozen"] - 1.0)
        over_o = 100.0 * (r["ort_fp32"] / r["ort_frozen"] - 1.0)
        name = r["variant"] + (" (merged)" if r["merged"] else "")
        t.add_row(r["backbone"], name, str(r["batch"]), f"{r['eager_frozen']:.2f}", f"{r['eager_adapter']:.2f}",
                  f"{r['ort_frozen']:.2f}", f"{r['ort_fp32']:.2f}", f"{r['ort_int8']:.2f}",
                  f"{r['ort_fp32'] / r['eager_adapter']:.2f}", f"{over_e:+.1f}%", f"{over_o:+.1f}%",
                  f"{r['eager_adapter'] - r['eager_frozen']:+.2f}", f"{r['ort_fp32'] - r['ort_frozen']:+.2f}")
    Console(width=max(200, Console().width)).print(t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--adapters", default="bottleneck,lora")
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tower", choices=("image", "text"), default="image")
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--big", action="store_true", help="also open_clip ViT-B-32 (random init)")
    ap.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    variants = [v.strip() for v in args.adapters.split(",") if v.strip()]
    batches = [int(b) for b in args.batches.split(",")]
    specs = ["tiny@random"] + (["open_clip:ViT-B-32"] if args.big else [])
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as d:
        for spec in specs:
            work = Path(d) / spec.replace(":", "_").replace("@", "_")
            print(f"{spec}: exporting and timing…", file=sys.stderr)
            rows += bench_backbone(spec, variants, batches, args.threads, args.tower, args.repeats, work)
    render(rows, args.threads, args.tower)
    if args.json:
        Path(args.json).write_text(json.dumps({"threads": args.threads, "tower": args.tower, "rows": rows}, indent=2))


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
