"""Load test of `vlkit serve` on 127.0.0.1: one backbone with 8 adapters against one process per adapter.

    python bench/serve.py [--quick] [--backbone tiny] [--device cpu|cuda] [--seconds 6]
    python bench/serve.py --peer infinity [--quick] [--threads 1] [--device cpu|cuda]

Starts its own servers (subprocesses on free loopback ports), runs a bounded closed-loop load (concurrency 1, 8,
32; each client sends /v1/classify requests back to back for a fixed time) with 1 adapter and with 8 adapters
mixed uniformly, under dynamic batching (--max-batch 32 --max-wait-ms 5) and batch-1 serving (--max-batch 1),
beside the one-adapter-per-process alternative (8 servers, each request sent to its adapter's server). Prints one
table (throughput, p50/p99 latency, server RSS) and the ratios the goals name, then stops every server.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ["circle", "square", "triangle", "star", "cross", "ring"]


def make_adapters(root: Path, spec: str, n: int) -> list[Path]:
    import torch

    import vlkit
    from vlkit.adapters.inject import adapter_layers

    out = []
    for i in range(n):
        bb = vlkit.load_backbone(spec)
        name = f"a{i}"
        vlkit.inject(bb, "bottleneck", name=name, reduction=8)
        g = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for layer in adapter_layers(bb, name).values():
                for p in layer.parameters():
                    p.add_(0.05 * torch.randn(p.shape, generator=g))
        d = vlkit.save_adapter(bb, root / name, name=name)
        (d / "task.json").write_text(json.dumps({"name": "classification", "metric": "accuracy",
                                                 "options": {"class_names": CLASSES, "prompt": "a photo of a {}"}}))
        out.append(d)
    return out


def forward_ceiling(spec: str, device: str | None, threads: int | None) -> dict[int, float]:
    """Milliseconds per image of one bare image-encoder forward at batch 1 and 32 (median of 15), in this
    process with the servers' thread count: what batching can gain at most from the model itself."""
    import statistics

    import torch

    import vlkit

    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        bb = vlkit.load_backbone(spec).eval().to(device or "cpu")
        out = {}
        for b in (1, 32):
            px = torch.randn(b, 3, bb.image_size, bb.image_size, device=device or "cpu")
            ts = []
            with torch.no_grad():
                for _ in range(15):
                    t0 = time.perf_counter()
                    bb.encode_image(px)
                    if device and device.startswith("cuda"):
                        torch.cuda.synchronize()
                    ts.append(time.perf_counter() - t0)
            out[b] = statistics.median(ts) / b * 1000
        return out
    finally:
        torch.set_num_threads(before)


def images(n: int, size: int) -> list[str]:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buf, "PNG")
        out.append(base64.b64encode(buf.getvalue()).decode())
    return out


class Server:
    def __init__(self, spec: str, adapters: list[Path], args: list[str], device: str | None, threads: int | None = None):
        cmd = [sys.executable, "-m", "vlkit", "serve", "--backbone", spec, "--port", "0", "--queue-size", "4096",
               "--adapters", ",".join(str(a) for a in adapters), *args, *(["--device", device] if device else []),
               *(["--threads", str(threads)] if threads else [])]
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     text=True)
        self.url = None

    def wait(self) -> "Server":
        t0 = time.time()
        while time.time() - t0 < 300:
            line = self.proc.stderr.readline()
            if not line and self.proc.poll() is not None:
                raise SystemExit(f"server failed to start (exit {self.proc.returncode})")
            if "vlkit serve:" in line and "http://" in line:
                self.url = line.split(" on ")[1].split(" ")[0]
                threading.Thread(target=self.proc.stderr.read, daemon=True).start()
                return self
        raise SystemExit("server did not start in 300 s")

    def rss_mb(self) -> float:
        import psutil

        return psutil.Process(self.proc.pid).memory_info().rss / 2**20

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


async def load(route, names: list[str], concurrency: int, seconds: float, imgs: list[str], seed: int = 0):
    """Closed loop: `concurrency` clients, each sending requests back to back; `route(name)` -> base URL."""
    import httpx

    rng = random.Random(seed)
    lat: list[float] = []
    errors = 0
    limits = httpx.Limits(max_connections=concurrency * 2, max_keepalive_connections=concurrency * 2)
    async with httpx.AsyncClient(timeout=60, limits=limits) as client:
        async def one(name):
            nonlocal errors
            body = {"adapter": name, "image": rng.choice(imgs)}
            t0 = time.perf_counter()
            r = await client.post(route(name) + "/v1/classify", json=body)
            if r.status_code != 200:
                errors += 1
            return time.perf_counter() - t0

        for _ in range(2):  # warm up every connection path
            await asyncio.gather(*(one(rng.choice(names)) for _ in range(concurrency)))
        stop = time.perf_counter() + seconds

        async def worker():
            while time.perf_counter() < stop:
                lat.append(await one(rng.choice(names)))

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    lat.sort()
    q = lambda p: lat[min(len(lat) - 1, int(p * len(lat)))] * 1000  # noqa: E731
    return {"rps": len(lat) / wall, "p50": q(0.5), "p99": q(0.99), "n": len(lat), "errors": errors}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="2 s per point instead of 6")
    ap.add_argument("--backbone", default="tiny")
    ap.add_argument("--device", default=None)
    ap.add_argument("--seconds", type=float, default=None)
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    ap.add_argument("--threads", type=int, default=None,
                    help="each server's torch threads (vlkit serve --threads; default: torch's)")
    ap.add_argument("--peer", choices=["infinity"], default=None,
                    help="compare with another server on one transformers CLIP (bench/serve_peer.py)")
    a = ap.parse_args()
    seconds = a.seconds or (2.0 if a.quick else 6.0)
    if a.peer == "infinity":
        from serve_peer import run

        run(seconds, a.threads or 1, a.device, make_adapters)
        return
    conc = (1, 8, 32)
    with tempfile.TemporaryDirectory(prefix="vlkit-bench-serve-") as tmp:
        dirs = make_adapters(Path(tmp), a.backbone, 8)
        import vlkit

        size = vlkit.load_backbone(a.backbone).image_size
        imgs = images(16, size)
        names = [d.name for d in dirs]
        adapter_bytes = sum((d / "adapter_model.safetensors").stat().st_size for d in dirs) / 8
        rows, res = [], {}
        for mode, args in (("dynamic", ["--max-batch", "32", "--max-wait-ms", "5"]),
                           ("batch-1", ["--max-batch", "1", "--max-wait-ms", "0"])):
            srv = Server(a.backbone, dirs, args, a.device, a.threads).wait()
            try:
                for label, use in (("1 adapter", names[:1]), ("8 mixed", names)):
                    for c in conc:
                        r = asyncio.run(load(lambda n: srv.url, use, c, seconds, imgs))
                        r["rss"] = srv.rss_mb()
                        res[(mode, label, c)] = r
                        rows.append([f"1 server, {mode}", label, c, r])
                        print(f"  {mode:8s} {label:9s} c={c:<3d} {r['rps']:8.1f} req/s", file=sys.stderr, flush=True)
            finally:
                srv.stop()
        procs = [Server(a.backbone, [d], ["--max-batch", "32", "--max-wait-ms", "5"], a.device, a.threads)
                 for d in dirs]
        try:
            for p in procs:
                p.wait()
            urls = {n: p.url for n, p in zip(names, procs)}
            for c in conc:
                r = asyncio.run(load(lambda n: urls[n], names, c, seconds, imgs))
                r["rss"] = sum(p.rss_mb() for p in procs)
                res[("8 processes", "8 mixed", c)] = r
                rows.append(["8 servers (1 adapter each), dynamic", "8 mixed", c, r])
                print(f"  8 procs  8 mixed   c={c:<3d} {r['rps']:8.1f} req/s", file=sys.stderr, flush=True)
            one_rss = sum(p.rss_mb() for p in procs) / len(procs)
        finally:
            for p in procs:
                p.stop()
    dev = a.device or "cpu"
    ceiling = forward_ceiling(a.backbone, a.device, a.threads)
    print(f"\nvlkit serve — backbone {a.backbone} on {dev}, POST /v1/classify, {seconds:g} s per point, "
          f"{os.cpu_count()} CPU cores (client and servers share them)\n")
    print("| setup | adapters | concurrency | req/s | p50 ms | p99 ms | server RSS MiB |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for setup, label, c, r in rows:
        err = f" ({r['errors']} errors)" if r["errors"] else ""
        print(f"| {setup} | {label} | {c} | {r['rps']:.1f}{err} | {r['p50']:.1f} | {r['p99']:.1f} | {r['rss']:.0f} |")
    mixed = res[("dynamic", "8 mixed", 32)]["rps"] / res[("dynamic", "1 adapter", 32)]["rps"]
    batching = res[("dynamic", "8 mixed", 32)]["rps"] / res[("batch-1", "8 mixed", 32)]["rps"]
    batching1 = res[("dynamic", "1 adapter", 32)]["rps"] / res[("batch-1", "1 adapter", 32)]["rps"]
    rss1 = res[("dynamic", "8 mixed", 32)]["rss"]
    rss8 = res[("8 processes", "8 mixed", 32)]["rss"]
    expect = one_rss + 7 * adapter_bytes / 2**20
    print("\n| goal | measured | target |")
    print("|---|---:|---:|")
    print(f"| 8 mixed adapters / 1 adapter, throughput at c=32 (dynamic) | {mixed:.2f}x | >= 0.8x |")
    print(f"| dynamic batching / batch-1, throughput at c=32 (8 mixed) | {batching:.2f}x | >= 3x |")
    print(f"| dynamic batching / batch-1, throughput at c=32 (1 adapter) | {batching1:.2f}x | >= 3x |")
    print(f"| RSS: 1 server with 8 adapters / 8 servers | {rss1:.0f} / {rss8:.0f} MiB = {rss1 / rss8:.2f}x | ~1/8 |")
    print(f"| RSS: 1 server with 8 adapters / (1-adapter server + 7 adapters' weights) | {rss1 / expect:.2f}x "
          f"({rss1:.0f} vs {expect:.0f} MiB) | ~1x |")
    print(f"| throughput: 1 server, 8 mixed / 8 servers at c=32 | "
          f"{res[('dynamic', '8 mixed', 32)]['rps'] / res[('8 processes', '8 mixed', 32)]['rps']:.2f}x | |")
    print(f"| model alone: image forward ms/image, batch 1 / batch 32 (the most batching can gain in compute) | "
          f"{ceiling[1]:.2f} / {ceiling[32]:.2f} ms = {ceiling[1] / ceiling[32]:.2f}x | |")
    if a.json:
        a.json.write_text(json.dumps({**{f"{k[0]}|{k[1]}|{k[2]}": v for k, v in res.items()},
                                      "forward_ms_per_image": ceiling}, indent=1))


if __name__ == "__main__":
    main()
