"""`python bench/serve.py --peer infinity`: `vlkit serve` against Infinity (`infinity-emb`) on the same model.

Both servers serve one random-init transformers CLIP directory (width 256, 4+4 layers, 224 px, patch 32, written
with save_pretrained with its tokenizer and image processor) with the same torch threads; both are up, and one at a
time is loaded, alternating per point (the order swapped every point). Each takes OpenAI-style
`POST /v1/embeddings` (vlkit: `model` = the frozen backbone; images as data URIs with `"modality": "image"`, as
Infinity takes them), one input per request, closed loop at concurrency 1, 8 and 32. First the embeddings of both
are compared (cosine >= 0.999 required for texts within Infinity's 20 tokens and for images; longer texts shown
apart), then throughput, p50, RSS and the ratios the goals name; vlkit with 8 adapters mixed is measured beside its
frozen-backbone figure at concurrency 32.

Infinity is installed on first use into its own environment (build/infinity-venv: `infinity-emb` and the
transformers 4 it needs, taking torch and numpy from this environment through a .pth file). When it cannot be
installed or does not start, the table says so and holds vlkit's side only.
"""
from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import random
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VENV = ROOT / "build" / "infinity-venv"
# Infinity 0.0.78 runs on transformers 4 (5 changed get_text_features) and sentence-transformers 3, whose model
# card imports datasets (3, for the hub 0.x that transformers 4 takes); torch and numpy come from here.
PINS = ["infinity-emb==0.0.78", "click>=8,<8.2", "typer>=0.12.5,<0.13", "rich>=13,<14",
        "uvicorn[standard]>=0.32,<0.33", "orjson>=3.9.8,!=3.10.0", "posthog", "prometheus-fastapi-instrumentator>=6.1",
        "transformers>=4.47,<4.58"]
NO_DEPS = ["sentence-transformers>=3.0.1,<4", "datasets>=3,<4"]
WORDS = "a photo of red blue green small large cat dog house tree car on the left right with two three".split()


def ensure_infinity(venv: Path = VENV) -> str | None:
    """`venv` with infinity-emb (made once); None, or why it cannot be had."""
    exe = venv / "bin" / "infinity_emb"
    if exe.exists() and subprocess.run([str(exe), "v2", "--help"], capture_output=True).returncode == 0:
        return None
    print(f"[peer] making {venv} (once): {PINS[0]}, torch/transformers/numpy from this environment",
          file=sys.stderr, flush=True)
    base = Path(sys.prefix).resolve()
    site = next((base / "lib").glob("python3*/site-packages"))
    steps = [[sys.executable, "-m", "venv", str(venv)]]
    py = str(venv / "bin" / "python")
    for cmd in steps + [[py, "-m", "pip", "install", "-q", *PINS], [py, "-m", "pip", "install", "-q", "--no-deps",
                                                                    *NO_DEPS], [py, "-m", "pip", "uninstall", "-y",
                                                                                "-q", "numpy"]]:
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0 and "uninstall" not in cmd:
            tail = (r.stderr or r.stdout).strip().splitlines()[-1:] or ["(no output)"]
            return f"`{' '.join(cmd[:5])} ...` failed: {tail[0][:200]}"
        if cmd == steps[0]:
            pth = next((venv / "lib").glob("python3*/site-packages")) / "_vlkit_base.pth"
            pth.write_text(str(site) + "\n")
    if subprocess.run([str(exe), "v2", "--help"], capture_output=True).returncode != 0:
        return f"{venv} was made but infinity_emb does not run"
    return None


def write_model(d: Path, seed: int = 0) -> Path:
    """The shared CLIP directory: transformers CLIPModel, random init, width 256, 4+4 layers, 224 px, patch 32,
    open_clip's BPE as a CLIPTokenizer, a CLIPImageProcessor, all with save_pretrained."""
    import torch
    from open_clip.tokenizer import SimpleTokenizer
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    if (d / "config.json").exists():
        return d
    simple = SimpleTokenizer()
    src = d / "_tok"
    src.mkdir(parents=True, exist_ok=True)
    (src / "vocab.json").write_text(json.dumps(simple.encoder))
    merges = sorted(simple.bpe_ranks, key=simple.bpe_ranks.get)
    (src / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    tok = CLIPTokenizer(str(src / "vocab.json"), str(src / "merges.txt"))
    eot, sot = tok.convert_tokens_to_ids("<|endoftext|>"), tok.convert_tokens_to_ids("<|startoftext|>")
    cfg = CLIPConfig(
        vision_config=dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
                           image_size=224, patch_size=32),
        text_config=dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
                         vocab_size=len(tok), max_position_embeddings=77, eos_token_id=eot, bos_token_id=sot,
                         pad_token_id=eot),
        projection_dim=256)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPModel(cfg).eval()
    model.save_pretrained(d, safe_serialization=True)
    proc = CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224})
    CLIPProcessor(image_processor=proc, tokenizer=tok).save_pretrained(d)
    import shutil

    shutil.rmtree(src)
    return d


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Proc:
    """One server subprocess on 127.0.0.1; `url` once /health (vlkit) or /models (Infinity) answers."""

    def __init__(self, cmd: list[str], url: str, probe: str, threads: int, env_extra: dict | None = None,
                 embeddings: str = "/v1/embeddings"):
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), PYTHONPATH=str(ROOT),
                   INFINITY_ANONYMOUS_USAGE_STATS="0", DO_NOT_TRACK="1", **(env_extra or {}))
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     text=True)
        self.url, self.probe, self.embeddings = url, probe, url + embeddings
        self.log: list[str] = []

    def wait(self, timeout: float = 600) -> Proc:
        import threading

        import httpx

        threading.Thread(target=lambda: self.log.extend(self.proc.stderr), daemon=True).start()
        t0 = time.time()
        while time.time() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"exited {self.proc.returncode}: {''.join(self.log[-5:])[-600:]}")
            try:
                if httpx.get(self.url + self.probe, timeout=5).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(1)
        raise RuntimeError("did not start in time")

    def rss_mb(self) -> float:
        import psutil

        p = psutil.Process(self.proc.pid)
        return sum(c.memory_info().rss for c in [p, *p.children(recursive=True)]) / 2**20

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def vlkit_server(model: Path, adapters: list[Path], threads: int, device: str | None) -> Proc:
    port = free_port()
    cmd = [sys.executable, "-m", "vlkit", "serve", "--backbone", f"hf:{model}", "--port", str(port),
           "--threads", str(threads), "--max-batch", "32", "--max-wait-ms", "5", "--queue-size", "4096",
           *(["--adapters", ",".join(map(str, adapters))] if adapters else []),
           *(["--device", device] if device else [])]
    return Proc(cmd, f"http://127.0.0.1:{port}", "/health", threads)


def infinity_server(model: Path, threads: int, device: str | None) -> Proc:
    port = free_port()
    cmd = [str(VENV / "bin" / "infinity_emb"), "v2", "--model-id", str(model), "--port", str(port), "--host",
           "127.0.0.1", "--engine", "torch", "--device", device or "cpu", "--batch-size", "32",
           "--no-bettertransformer", "--served-model-name", "clip"]
    return Proc(cmd, f"http://127.0.0.1:{port}", "/models", threads, {"HF_HUB_OFFLINE": "1"}, "/embeddings")


def inputs(kind: str, n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    if kind == "text":  # 3 to 16 words, within the 20 tokens Infinity keeps, so both compute the same thing
        return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 16))) for _ in range(n)]
    import numpy as np
    from PIL import Image

    g = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        buf = io.BytesIO()
        Image.fromarray(g.integers(0, 255, (256, 256, 3), dtype=np.uint8)).save(buf, "PNG")
        out.append("data:image/png;base64," + base64.b64encode(buf.getvalue()).decode())
    return out


def body(model: str, kind: str, items: list[str]) -> dict:
    out = {"model": model, "input": items, "encoding_format": "float"}
    if kind == "image":
        out["modality"] = "image"
    return out


def embed(endpoint: str, model: str, kind: str, items: list[str]) -> list[list[float]]:
    import httpx

    r = httpx.post(endpoint, json=body(model, kind, items), timeout=300)
    r.raise_for_status()
    return [d["embedding"] for d in sorted(r.json()["data"], key=lambda d: d["index"])]


async def load(endpoint: str, models: list[str], kind: str, concurrency: int, seconds: float, pool: list[str]):
    """Closed loop: `concurrency` clients sending one-input requests back to back."""
    import httpx

    rng = random.Random(1)
    lat: list[float] = []
    errors = 0
    limits = httpx.Limits(max_connections=concurrency * 2, max_keepalive_connections=concurrency * 2)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        async def one():
            nonlocal errors
            t0 = time.perf_counter()
            r = await client.post(endpoint, json=body(rng.choice(models), kind, [rng.choice(pool)]))
            errors += r.status_code != 200
            return time.perf_counter() - t0

        await asyncio.gather(*(one() for _ in range(concurrency)))
        stop = time.perf_counter() + seconds

        async def worker():
            while time.perf_counter() < stop:
                lat.append(await one())

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    lat.sort()
    q = lambda p: lat[min(len(lat) - 1, int(p * len(lat)))] * 1000 if lat else float("nan")  # noqa: E731
    return {"rps": len(lat) / wall, "p50": q(0.5), "p99": q(0.99), "n": len(lat), "errors": errors}


def cosines(a: list[list[float]], b: list[list[float]]) -> list[float]:
    import numpy as np

    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    y /= np.linalg.norm(y, axis=1, keepdims=True)
    return (x * y).sum(1).tolist()


def measure(procs: dict, models: dict, mixed: list[str], seconds: float, pools: dict) -> dict:
    """Both servers up, loaded one at a time: each point runs on one server, then on the other (the order
    swapped every point, so a change of the machine's load falls on both)."""
    out: dict = {name: {} for name in procs}
    order = list(procs)
    for kind in ("text", "image"):
        for c in (1, 8, 32):
            for name in order:
                out[name][(kind, c)] = asyncio.run(load(procs[name].embeddings, models[name], kind, c, seconds,
                                                        pools[kind]))
                print(f"  {name:8s} {kind:5s} c={c:<3d} {out[name][(kind, c)]['rps']:8.1f} req/s", file=sys.stderr,
                      flush=True)
            order.reverse()
        if mixed:  # vlkit: 8 adapters mixed, next to its frozen-backbone figure measured again
            for label, use in (("mixed", mixed), ("single", models["vlkit"])):
                out["vlkit"][(kind, label)] = asyncio.run(load(procs["vlkit"].embeddings, use, kind, 32, seconds,
                                                               pools[kind]))
    for name, proc in procs.items():
        out[name]["rss"] = proc.rss_mb()
    return out


def run(seconds: float, threads: int, device: str | None, make_adapters) -> None:
    """The whole comparison; prints the table and the goals (`make_adapters(root, spec, n)` from bench/serve.py)."""
    import tempfile

    why = ensure_infinity()
    model = write_model(ROOT / "build" / "peer-clip")
    pools = {"text": inputs("text", 64), "image": inputs("image", 16)}
    short = [" ".join(WORDS[i % len(WORDS)] for i in range(k, k + n)) for k, n in ((0, 3), (5, 8), (9, 16))]
    long = [" ".join(WORDS[(i * 7) % len(WORDS)] for i in range(n)) for n in (30, 60)]
    probes = {"text-short": short, "text-long": long, "image": inputs("image", 4, seed=5)}
    models = {"vlkit": ["none"], "infinity": ["clip"]}
    with tempfile.TemporaryDirectory(prefix="vlkit-bench-peer-") as tmp:
        dirs = make_adapters(Path(tmp), f"hf:{model}", 8)
        procs = {"vlkit": vlkit_server(model, dirs, threads, device)}
        if why is None:
            procs["infinity"] = infinity_server(model, threads, device)
        try:
            for name in list(procs):
                try:
                    procs[name].wait()
                except RuntimeError as exc:
                    if name == "vlkit":
                        raise
                    why = f"Infinity did not serve the model: {exc}"[:300]
                    procs.pop(name).stop()
            probe = {name: {k: embed(p.embeddings, models[name][0], k.split("-")[0], v) for k, v in probes.items()}
                     for name, p in procs.items()}
            results = measure(procs, models, [d.name for d in dirs], seconds, pools)
            for name in results:
                results[name]["probe"] = probe[name]
        finally:
            for p in procs.values():
                p.stop()
    report(results, why, seconds, threads, device)


def report(res: dict, why: str | None, seconds: float, threads: int, device: str | None) -> None:
    v, i = res["vlkit"], res.get("infinity")
    print(f"\nvlkit serve vs Infinity 0.0.78 — transformers CLIP (random init, width 256, 4+4 layers, 224 px), "
          f"POST /v1/embeddings, one input per request, {seconds:g} s per point, {threads} torch thread(s) each, "
          f"{device or 'cpu'}, {os.cpu_count()} CPU cores shared by client and server\n")
    if why:
        print(f"Infinity: not measured ({why}); vlkit's side only.\n")
    print("| input | concurrency | vlkit req/s | Infinity req/s | ratio | vlkit p50 ms | Infinity p50 ms | p50 ratio |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    worst_tp, worst_p50 = float("inf"), 0.0
    for kind in ("text", "image"):
        for c in (1, 8, 32):
            a = v[(kind, c)]
            if i is None:
                print(f"| {kind} | {c} | {a['rps']:.1f} | | | {a['p50']:.1f} | | |")
                continue
            b = i[(kind, c)]
            tp, p50 = a["rps"] / b["rps"], a["p50"] / b["p50"]
            worst_tp, worst_p50 = min(worst_tp, tp), max(worst_p50, p50)
            print(f"| {kind} | {c} | {a['rps']:.1f} | {b['rps']:.1f} | {tp:.2f}x | {a['p50']:.1f} | {b['p50']:.1f} | "
                  f"{p50:.2f}x |")
    print("\n| goal | measured | target |")
    print("|---|---:|---:|")
    if i is not None:
        agree = {k: cosines(v["probe"][k], i["probe"][k]) for k in v["probe"]}
        print(f"| agreement, cosine (texts within 20 tokens; images) | min {min(agree['text-short']):.5f}; "
              f"min {min(agree['image']):.5f} | >= 0.999 |")
        print(f"| texts of 30 and 60 words (Infinity cuts CLIP text at 20 tokens) | cosine "
              f"{', '.join(f'{x:.3f}' for x in agree['text-long'])} | (vlkit keeps 77) |")
        print(f"| throughput, vlkit / Infinity, worst of text and image at c = 1, 8, 32 | {worst_tp:.2f}x | >= 1.0x |")
        print(f"| p50 latency, vlkit / Infinity, worst point | {worst_p50:.2f}x | <= 1.0x |")
        print(f"| RSS, vlkit / Infinity | {v['rss']:.0f} / {i['rss']:.0f} MiB = {v['rss'] / i['rss']:.2f}x | <= 1.0x |")
    else:
        print(f"| RSS, vlkit | {v['rss']:.0f} MiB | |")
    for kind in ("text", "image"):
        m = v[(kind, "mixed")]["rps"] / v[(kind, "single")]["rps"]
        print(f"| {kind}: 8 adapters mixed / frozen backbone alone, vlkit at c=32 | {m:.2f}x | >= 0.8x |")
