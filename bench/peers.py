"""vlkit side by side with PEFT and AdapterHub `adapters` on the same transformers CLIP, in one process.

The backbone is a transformers `CLIPModel` with the ViT-B/32 architecture at random init (`--size full`,
the default on a GPU) or at half width and half depth (`--size half`, the default on CPU: vision 384 wide,
6 layers; text 256 wide, 6 layers; 224 px images in 32 px patches), saved once and loaded by every side, so
all three adapt the same weights. The table says which size ran. Matched configurations, vision tower only:

    LoRA q,v          rank 8, alpha 16 on q_proj, v_proj
    LoRA all          rank 8, alpha 16 on q, k, v, out, fc1, fc2 (adapters: q, k, v, fc1, fc2; it has no out_proj LoRA)
    bottleneck        vlkit bottleneck after the MLP, reduction 16, relu  ~ adapters seq_bn (Pfeiffer)
    bottleneck x2     vlkit bottleneck after attention and MLP, reduction 16, silu ~ adapters double_seq_bn (Houlsby)
    (IA)^3            k, v and the MLP hidden activation (adapters scales fc1's output, before the activation)
    DoRA              rank 8, alpha 16 on q_proj, v_proj (PEFT use_dora, adapters DoRAConfig)

PEFT has no bottleneck adapter; those cells say so. A peer that does not import is reported absent with the
reason. AdapterHub `adapters` 1.3 pins transformers 4.57, which vlkit's own environment does not have, so
this script runs itself inside a second virtual environment (`--peers-venv DIR`, default build/peers-venv;
made on first use with transformers 4.57.6, adapters 1.3.0, peft 0.21.2 and vlkit installed editable from
this checkout). Pass `--no-peers-venv` to run here, with `adapters` absent.

Metrics (all from this run; ratios are vlkit over the best peer's figure and over the frozen model's, lower is
better; for times, the median of per-round ratios; one torch thread on CPU unless `--threads`):

- step: one training step of a CLIP classifier whose head is the class prompts' text embeddings: a batch of
  images through the adapted vision tower, the prompts through the frozen text tower, cross-entropy, AdamW.
  Median of rounds that run one step of every side in turn. `vlkit + cache` is the same step with vlkit's
  frozen-tower feature cache (`data.feature_cache`, on by default in recipes): a tower with no trainable
  parameter is run once per dataset, so the text tower drops out of the step;
- step memory: parameters, gradients, AdamW state and the activations autograd saves for the backward pass
  (each storage once, through saved-tensor hooks: CPU has no allocator peak); on CUDA the allocator peak;
- held memory: the bytes of every distinct tensor storage reachable from the model object (parameters,
  buffers and any tensor an attribute keeps, e.g. a saved copy of the weights), unmerged and merged
  (vlkit `merge_and_unload`, PEFT `merge_and_unload`, adapters `merge_adapter`); `frozen` is the bare model;
- latency: one image-encoder forward (no grad) at batch 1 and 32, unmerged and merged, median of rounds;
- export: `vlkit export` (its Python API `export_model`, with its default checks: random and real inputs,
  eval-set score) of one LoRA-all adapter against a bare `torch.onnx.export` of the same two graphs.

    python bench/peers.py [--quick] [--size half|full] [--peers-venv DIR | --no-peers-venv] [--json out.json]
                          [--profile]

`--quick` is a CI-sized run (a small CLIP, few rounds; its figures are not the comparison). `--profile`
prints the operator profile of one (IA)^3 step of vlkit and of PEFT.
"""
from __future__ import annotations

import argparse
import gc
import importlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CHILD_ENV = "VLKIT_PEERS_CHILD"
DEFAULT_VENV = ROOT / "build" / "peers-venv"
PEER_PINS = ["transformers==4.57.6", "adapters==1.3.0", "peft==0.21.2"]

ARCH = {
    "full": {"vision": (768, 3072, 12, 12), "text": (512, 2048, 12, 8), "proj": 512, "image": 224,
             "label": "ViT-B/32 architecture, random init"},
    "half": {"vision": (384, 1536, 6, 6), "text": (256, 1024, 6, 4), "proj": 256, "image": 224,
             "label": "ViT-B/32 at half width and depth (vision 384x6, text 256x6), random init"},
    "quick": {"vision": (128, 512, 2, 2), "text": (128, 512, 2, 2), "proj": 128, "image": 224,
              "label": "small CLIP for --quick (vision 128x2, text 128x2), random init"},
}


# --- the peers' environment ---------------------------------------------------------------------
def _peer_status() -> dict[str, str | None]:
    """None for each peer that imports here, else why not."""
    out: dict[str, str | None] = {}
    for name in ("peft", "adapters"):
        try:
            importlib.import_module(name)
            out[name] = None
        except Exception as exc:  # an ImportError, or a version check raising anything
            out[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:160]
    return out


def _venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def ensure_peers_venv(venv: Path) -> str | None:
    """Make `venv` with the peers' pins and vlkit (editable) unless it works already; None or why it failed."""
    py = _venv_python(venv)
    check = [str(py), "-c", "import adapters, peft, transformers, vlkit; print(transformers.__version__)"]
    if py.exists() and subprocess.run(check, capture_output=True).returncode == 0:
        return None
    print(f"[peers] making {venv} (once): {', '.join(PEER_PINS)}, torch as here, vlkit from {ROOT} ...",
          file=sys.stderr, flush=True)
    import torch

    torch_pins = [f"torch=={torch.__version__.split('+')[0]}"]
    try:
        import torchvision

        torch_pins.append(f"torchvision=={torchvision.__version__.split('+')[0]}")
    except ImportError:
        pass
    steps = [[sys.executable, "-m", "venv", str(venv)],
             [str(py), "-m", "pip", "install", "-q", *torch_pins, *PEER_PINS],
             [str(py), "-m", "pip", "install", "-q", "-e", str(ROOT), *PEER_PINS]]
    plugin = ROOT / "plugins" / "vlkit-ia3"
    if plugin.is_dir():
        steps.append([str(py), "-m", "pip", "install", "-q", "--no-deps", "-e", str(plugin)])
    for cmd in steps:
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            tail = (r.stderr or r.stdout).strip().splitlines()[-1:] or ["(no output)"]
            return f"`{' '.join(cmd[:4])} ...` failed: {tail[0][:200]}"
    if subprocess.run(check, capture_output=True).returncode != 0:
        return f"{venv} was made but cannot import adapters, peft and vlkit"
    return None


# --- the shared backbone ------------------------------------------------------------------------
def write_clip(d: Path, size: str, seed: int = 0) -> Path:
    """A random-init transformers CLIPModel of `size` with a CLIP tokenizer (open_clip's BPE) in `d`."""
    import torch
    from open_clip.tokenizer import SimpleTokenizer
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    simple = SimpleTokenizer()
    src = d / "_tok"
    src.mkdir(parents=True, exist_ok=True)
    (src / "vocab.json").write_text(json.dumps(simple.encoder))
    merges = sorted(simple.bpe_ranks, key=simple.bpe_ranks.get)
    (src / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    tok = CLIPTokenizer(str(src / "vocab.json"), str(src / "merges.txt"))
    tok.save_pretrained(d)
    a = ARCH[size]
    (vw, vi, vl, vh), (tw, ti, tl, th) = a["vision"], a["text"]
    eot, sot = tok.convert_tokens_to_ids("<|endoftext|>"), tok.convert_tokens_to_ids("<|startoftext|>")
    cfg = CLIPConfig(
        vision_config=dict(hidden_size=vw, intermediate_size=vi, num_hidden_layers=vl, num_attention_heads=vh,
                           image_size=a["image"], patch_size=32),
        text_config=dict(hidden_size=tw, intermediate_size=ti, num_hidden_layers=tl, num_attention_heads=th,
                         vocab_size=len(tok), max_position_embeddings=77, eos_token_id=eot, bos_token_id=sot,
                         pad_token_id=eot),
        projection_dim=a["proj"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPModel(cfg).eval()
    model.save_pretrained(d, safe_serialization=True)
    import shutil

    shutil.rmtree(src)
    return d


# --- sides: one adapted model each ----------------------------------------------------------------
class Side:
    """One library's adapted model: image / text features, its trainable parameters, merge."""

    lib = ""

    def __init__(self, root, image, text, params, merge=None):
        self.root, self._image, self._text, self.params, self._merge = root, image, text, params, merge
        self.merged = False

    def image(self, px):
        return self._image(px)

    def text(self, ids, mask):
        return self._text(ids, mask)

    def merge(self) -> str | None:
        """Fold the adapter into the weights; None, or why this side cannot."""
        if self._merge is None:
            return "does not merge"
        why = self._merge()
        self.merged = why is None
        return why


def _features(out):
    """transformers 4.x returns the projected tensor; 5.x a ModelOutput with `pooler_output`."""
    import torch

    return out if isinstance(out, torch.Tensor) else out.pooler_output


def hf_side(model) -> Side:
    """A plain transformers CLIPModel (frozen, PEFT's base model or adapters' model)."""
    def image(px):
        return _features(model.get_image_features(pixel_values=px))

    def text(ids, mask):
        return _features(model.get_text_features(input_ids=ids, attention_mask=mask))

    return Side(model, image, text, [p for p in model.parameters() if p.requires_grad])


def frozen_side(clip_dir: Path) -> Side:
    from transformers import CLIPModel

    model = CLIPModel.from_pretrained(clip_dir).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return hf_side(model)


VLKIT = {
    "lora-qv": ("lora", {"rank": 8, "alpha": 16, "modules": "qv"}),
    "lora-all": ("lora", {"rank": 8, "alpha": 16, "modules": "all"}),
    "bottleneck": ("bottleneck", {"reduction": 16, "placement": "mlp", "activation": "relu"}),
    "bottleneck-x2": ("bottleneck", {"reduction": 16, "placement": "both", "activation": "silu"}),
    "ia3": ("ia3", {"modules": "attn_mlp"}),
    "dora": ("dora", {"rank": 8, "alpha": 16, "modules": "qv"}),
}
LABELS = {"lora-qv": "LoRA q,v", "lora-all": "LoRA all", "bottleneck": "bottleneck (seq_bn)",
          "bottleneck-x2": "bottleneck x2 (double_seq_bn)", "ia3": "(IA)^3", "dora": "DoRA q,v"}
VISION = r".*vision_model\.encoder\.layers\.\d+\.(self_attn|mlp)\.({})$"


def vlkit_side(clip_dir: Path, config: str, cache: bool = False) -> Side:
    import torch

    import vlkit
    from vlkit.adapters.inject import merge_and_unload
    from vlkit.tasks.features import frozen_towers, text_embed

    bb = vlkit.load_backbone(f"hf:{clip_dir}").eval()
    variant, opts = VLKIT[config]
    vlkit.inject(bb, variant, name="a", towers="vision", **opts)
    params = [p for p in bb.parameters() if p.requires_grad]
    names = [f"backbone.model.{n}" for n, p in bb.model.named_parameters() if p.requires_grad]
    cached: dict = {}

    def text(ids, mask):
        if not cache:
            return bb.encode_text({"input_ids": ids, "attention_mask": mask})
        if "text" not in frozen_towers(bb, names):
            raise RuntimeError("the feature cache needs a frozen text tower")
        if "emb" not in cached:  # what the feature cache stores: the frozen tower's embeddings, once
            with torch.no_grad():
                cached["emb"] = bb.encode_text({"input_ids": ids, "attention_mask": mask})
        return text_embed(bb, cached["emb"], normalize=False)

    def merge():
        var = VLKIT[config][0]
        if var in ("bottleneck",):
            return "a bottleneck is not a weight update"
        merge_and_unload(bb)
        return None

    return Side(bb, lambda px: bb.encode_image(px), text, params, merge)


def peft_side(clip_dir: Path, config: str) -> Side | str:
    """PEFT's model for `config`, or why there is none."""
    import peft
    from transformers import CLIPModel

    cfgs = {
        "lora-qv": lambda: peft.LoraConfig(r=8, lora_alpha=16, target_modules=VISION.format("q_proj|v_proj")),
        "lora-all": lambda: peft.LoraConfig(r=8, lora_alpha=16,
                                            target_modules=VISION.format("q_proj|k_proj|v_proj|out_proj|fc1|fc2")),
        "ia3": lambda: peft.IA3Config(target_modules=VISION.format("k_proj|v_proj|fc2"),
                                      feedforward_modules=VISION.format("fc2")),
        "dora": lambda: peft.LoraConfig(r=8, lora_alpha=16, use_dora=True,
                                        target_modules=VISION.format("q_proj|v_proj")),
    }
    if config not in cfgs:
        return "no bottleneck adapter in PEFT"
    model = CLIPModel.from_pretrained(clip_dir).eval()
    pm = peft.get_peft_model(model, cfgs[config]())
    side = hf_side(pm.base_model.model)
    side.root = pm
    side.params = [p for p in pm.parameters() if p.requires_grad]

    def merge():
        side.root = pm.merge_and_unload()
        return None

    side._merge = merge
    return side


def adapters_side(clip_dir: Path, config: str) -> Side | str:
    import adapters
    from transformers import CLIPModel

    model = CLIPModel.from_pretrained(clip_dir).eval()
    text_layers = list(range(model.config.text_config.num_hidden_layers))
    cfgs = {
        "lora-qv": lambda: adapters.LoRAConfig(r=8, alpha=16, attn_matrices=["q", "v"], leave_out=text_layers),
        "lora-all": lambda: adapters.LoRAConfig(r=8, alpha=16, attn_matrices=["q", "k", "v"], intermediate_lora=True,
                                                output_lora=True, leave_out=text_layers),
        "bottleneck": lambda: adapters.SeqBnConfig(reduction_factor=16, leave_out=text_layers),
        "bottleneck-x2": lambda: adapters.DoubleSeqBnConfig(reduction_factor=16, leave_out=text_layers),
        "ia3": lambda: adapters.IA3Config(leave_out=text_layers),
        "dora": lambda: adapters.DoRAConfig(r=8, alpha=16, attn_matrices=["q", "v"], leave_out=text_layers),
    }
    adapters.init(model)
    model.add_adapter("a", config=cfgs[config]())
    model.train_adapter("a")
    model.eval()
    side = hf_side(model)
    side.params = [p for p in model.parameters() if p.requires_grad]

    def merge():
        if config.startswith("bottleneck"):
            return "a bottleneck is not a weight update"
        try:
            model.merge_adapter("a")
        except Exception as exc:  # adapters raises ValueError / NotImplementedError for some methods
            return f"merge_adapter: {type(exc).__name__}"
        return None

    side._merge = merge
    return side


# --- measurements -------------------------------------------------------------------------------
def held_bytes(root) -> int:
    """Bytes of the distinct tensor storages reachable from `root` through attributes and containers."""
    import torch

    skip = (type, types.ModuleType, types.FunctionType, types.BuiltinFunctionType, types.MethodType,
            str, bytes, int, float, bool, type(None))
    seen: set[int] = set()
    storages: dict[int, int] = {}
    stack = [root]
    while stack:
        o = stack.pop()
        if id(o) in seen or isinstance(o, skip):
            continue
        seen.add(id(o))
        if isinstance(o, torch.Tensor):
            st = o.untyped_storage()
            storages[st.data_ptr()] = max(storages.get(st.data_ptr(), 0), st.nbytes())
            if o.grad is not None:
                stack.append(o.grad)
            continue
        if isinstance(o, dict):
            stack.extend(o.values())
        elif isinstance(o, (list, tuple, set, frozenset)):
            stack.extend(o)
        else:
            d = getattr(o, "__dict__", None)
            if isinstance(d, dict):
                stack.extend(d.values())
            for s in getattr(type(o), "__slots__", ()):
                if isinstance(s, str) and hasattr(o, s):
                    stack.append(getattr(o, s))
    return sum(storages.values())


class Batch:
    def __init__(self, clip_dir: Path, n_img: int, n_cls: int, image: int, seed: int = 0):
        import torch
        from transformers import CLIPTokenizer

        g = torch.Generator().manual_seed(seed)
        self.px = torch.randn(n_img, 3, image, image, generator=g)
        self.labels = torch.randint(0, n_cls, (n_img,), generator=g)
        tok = CLIPTokenizer.from_pretrained(clip_dir)
        prompts = [f"a photo of a {w}" for w in ("cat", "dog", "car", "tree", "house", "bird", "boat", "chair",
                                                 "cup", "lamp", "horse", "truck", "apple", "clock", "shoe", "bag")]
        enc = tok(prompts[:n_cls], padding="max_length", max_length=77, truncation=True, return_tensors="pt")
        self.ids, self.mask = enc["input_ids"], enc["attention_mask"]


def make_step(side: Side, batch: Batch):
    import torch
    import torch.nn.functional as F

    opt = torch.optim.AdamW(side.params, lr=1e-4)

    def step():
        img = F.normalize(side.image(batch.px), dim=-1)
        txt = F.normalize(side.text(batch.ids, batch.mask), dim=-1)
        loss = F.cross_entropy(100.0 * img @ txt.T, batch.labels)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step, opt


def step_memory(side: Side, batch: Batch) -> int:
    """Parameters + gradients + AdamW state + saved activations of one step (CUDA: the allocator peak)."""
    import torch
    import torch.nn.functional as F

    opt = torch.optim.AdamW(side.params, lr=1e-4)
    saved: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        saved.setdefault(st.data_ptr(), st.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        img = F.normalize(side.image(batch.px), dim=-1)
        txt = F.normalize(side.text(batch.ids, batch.mask), dim=-1)
        loss = F.cross_entropy(100.0 * img @ txt.T, batch.labels)
    loss.backward()
    opt.step()
    grads = sum(p.grad.numel() * p.grad.element_size() for p in side.params if p.grad is not None)
    state = sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values()
                if isinstance(v, torch.Tensor))
    opt.zero_grad(set_to_none=True)
    return held_bytes(side.root) + grads + state + sum(saved.values())


def interleaved(fns: dict, rounds: int, warmup: int = 1, budget_s: float | None = None) -> dict[str, list[float]]:
    """Seconds per call of each function in each round; a round calls each once (the order rotates)."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    keys = list(fns)
    times: dict[str, list[float]] = {k: [] for k in keys}
    start = time.perf_counter()
    for r in range(rounds):
        order = keys[r % len(keys):] + keys[:r % len(keys)]
        for k in order:
            t = time.perf_counter()
            fns[k]()
            times[k].append(time.perf_counter() - t)
        if budget_s is not None and time.perf_counter() - start > budget_s and r >= 2:
            break
    return times


def medians(times: dict[str, list[float]]) -> dict[str, float]:
    return {k: statistics.median(v) for k, v in times.items()}


def paired_ratio(times: dict[str, list[float]], key: str, other: str) -> float:
    """Median over rounds of key's time / other's time in the same round (load on the machine cancels)."""
    return statistics.median(a / b for a, b in zip(times[key], times[other]))


def latency_fns(sides: dict[str, Side], px) -> dict:
    import torch

    def call(s):
        def f():
            with torch.no_grad():
                s.image(px)
        return f

    return {k: call(s) for k, s in sides.items()}


# --- export ----------------------------------------------------------------------------------------
def bench_export(clip_dir: Path, work: Path, eval_n: int | None) -> dict:
    """`vlkit export` of one LoRA-all adapter vs bare torch.onnx.export of the same two graphs."""
    import torch

    import vlkit
    from vlkit.adapters.inject import adapter_layers, merge_and_unload
    from vlkit.export.api import build_graphs, export_model
    from vlkit.export.onnx_export import DEFAULT_OPSET, _quiet_export

    bb = vlkit.load_backbone(f"hf:{clip_dir}").eval()
    vlkit.inject(bb, "lora", name="lora", towers="vision", rank=8, alpha=16, modules="all")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in adapter_layers(bb, "lora").values():
            layer.lora_B.add_(0.02 * torch.randn(layer.lora_B.shape, generator=g))
    vlkit.save_adapter(bb, work / "adapter", name="lora")
    with _quiet_export(), torch.no_grad():  # torch.onnx's first-use cost, paid by neither side below
        torch.onnx.export(torch.nn.Linear(4, 4), (torch.randn(2, 4),), str(work / "warm.onnx"), dynamo=False)
    t = time.perf_counter()
    summary = export_model(work / "export", adapters=[work / "adapter"], eval_n=eval_n, overwrite=True)
    vlkit_s = time.perf_counter() - t
    merge_and_unload(bb)
    graphs = build_graphs(bb, None, None, False)
    t = time.perf_counter()
    for gr in graphs:
        with _quiet_export(), torch.no_grad():
            torch.onnx.export(gr.module.eval(), tuple(gr.inputs.values()), str(work / f"bare_{gr.name}.onnx"),
                              dynamo=False, input_names=list(gr.inputs), output_names=list(gr.outputs),
                              dynamic_axes=gr.dynamic_axes, opset_version=DEFAULT_OPSET, do_constant_folding=True)
    bare_s = time.perf_counter() - t
    return {"vlkit_s": vlkit_s, "bare_s": bare_s, "passed": bool(summary["passed"]),
            "graphs": [gr.name for gr in graphs], "eval_n": summary["scores"][0]["n"] if summary["scores"] else eval_n,
            "timings": summary.get("timings")}


# --- the run --------------------------------------------------------------------------------------
def run(args) -> dict:
    import torch

    status = _peer_status()
    if args.absent_reason and status.get("adapters"):
        status["adapters"] = args.absent_reason
    # one thread on CPU unless asked: on a shared machine several OpenMP threads wait on each other whenever one
    # is descheduled, which swamps the differences measured here (all sides get the same thread count)
    threads = args.threads or (0 if torch.cuda.is_available() else 1)
    if threads:
        torch.set_num_threads(threads)
    size = args.size or ("quick" if args.quick else ("full" if torch.cuda.is_available() else "half"))
    configs = [c for c in args.configs.split(",") if c]
    n_img = args.batch or (8 if args.quick else (32 if size == "full" else 16))
    rounds = args.rounds or (3 if args.quick else 7)
    lat_rounds = 5 if args.quick else 15
    lat32_rounds = 2
    import transformers

    versions = {"torch": torch.__version__.split("+")[0], "transformers": transformers.__version__}
    for lib in ("peft", "adapters"):
        if status[lib] is None:
            versions[lib] = importlib.import_module(lib).__version__
    results: dict = {"size": size, "arch": ARCH[size]["label"], "batch": n_img, "threads": torch.get_num_threads(),
                     "versions": versions, "absent": {k: v for k, v in status.items() if v}, "configs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        clip_dir = write_clip(Path(tmp) / "clip", size)
        batch = Batch(clip_dir, n_img, 10, ARCH[size]["image"])
        px1, px32 = batch.px[:1], torch.randn(32, 3, ARCH[size]["image"], ARCH[size]["image"])
        frozen = frozen_side(clip_dir)
        results["frozen"] = {"held": held_bytes(frozen.root)}
        for config in configs:
            t0 = time.perf_counter()
            sides: dict[str, Side] = {"vlkit": vlkit_side(clip_dir, config),
                                      "vlkit + cache": vlkit_side(clip_dir, config, cache=True)}
            notes: dict[str, str] = {}
            for lib, make in (("PEFT", peft_side), ("adapters", adapters_side)):
                why = status["peft" if lib == "PEFT" else "adapters"]
                if why:
                    notes[lib] = "absent"
                    continue
                got = make(clip_dir, config)
                if isinstance(got, str):
                    notes[lib] = got
                else:
                    sides[lib] = got
            row: dict = {"notes": notes}
            for s in sides.values():
                s.root.train() if hasattr(s.root, "train") else None
            steps = {k: make_step(s, batch)[0] for k, s in sides.items()}
            row["step_rounds"] = interleaved(steps, rounds, warmup=1)
            row["step_s"] = medians(row["step_rounds"])
            row["step_mem"] = {k: step_memory(s, batch) for k, s in sides.items() if k != "vlkit + cache"}
            sides.pop("vlkit + cache")
            for s in sides.values():
                s.root.eval() if hasattr(s.root, "eval") else None
            row["held"] = {k: held_bytes(s.root) for k, s in sides.items()}
            lat_sides = {"frozen": frozen, **sides}
            for name, px, n in (("lat1", px1, lat_rounds), ("lat32", px32, lat32_rounds)):
                row[f"{name}_rounds"] = interleaved(latency_fns(lat_sides, px), n, warmup=2 if name == "lat1" else 1)
                row[name] = medians(row[f"{name}_rounds"])
            merged = {}
            for k, s in sides.items():
                why = s.merge()
                if why is None:
                    merged[k] = s
                else:
                    notes.setdefault(f"{k} merged", why)
            gc.collect()
            row["held_merged"] = {k: held_bytes(s.root) for k, s in merged.items()}
            if merged:
                lat_sides = {"frozen": frozen, **merged}
                for name, px, n in (("lat1_merged", px1, lat_rounds), ("lat32_merged", px32, lat32_rounds)):
                    row[f"{name}_rounds"] = interleaved(latency_fns(lat_sides, px), n,
                                                        warmup=2 if name == "lat1_merged" else 1)
                    row[name] = medians(row[f"{name}_rounds"])
            row["seconds"] = time.perf_counter() - t0
            results["configs"][config] = row
            print(f"[peers] {LABELS[config]}: {row['seconds']:.0f} s", file=sys.stderr, flush=True)
            del sides, merged, lat_sides, steps
            gc.collect()
        if args.profile:
            profile_ia3(clip_dir, batch, status)
        if not args.no_export:
            results["export"] = bench_export(clip_dir, Path(tmp), eval_n=args.eval_n)
    return results


def profile_ia3(clip_dir: Path, batch: Batch, status) -> None:
    """The operator profile of one (IA)^3 training step, vlkit and PEFT (self CPU time, top operators)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    sides = {"vlkit": vlkit_side(clip_dir, "ia3")}
    if status["peft"] is None:
        sides["PEFT"] = peft_side(clip_dir, "ia3")
    for name, side in sides.items():
        step, _ = make_step(side, batch)
        step()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step()
        print(f"\n(IA)^3 step, {name}:")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


# --- the table --------------------------------------------------------------------------------------
HEADER = ["config", "metric", "frozen", "vlkit", "PEFT", "adapters", "vlkit / best peer", "vlkit / frozen", "goal",
          "met"]
STEP_GOAL = 0.9  # step time, LoRA and bottleneck, with the feature cache: <= 0.9x the best peer
IA3_GOAL = 1.0  # (IA)^3 step time: <= 1.0x PEFT
LAT1_GOAL = 1.15  # unmerged LoRA latency at batch 1: <= 1.15x frozen
EXPORT_GOAL = 2.0  # vlkit export: <= 2x a bare torch.onnx.export of the same graphs


def mb(x):
    return f"{x / 2**20:.0f} MB"


def ms(x):
    return f"{1000 * x:.1f} ms" if x < 1 else f"{x:.2f} s"


def table_rows(res: dict) -> list[list[str]]:
    """One row per (config, metric). Ratios of times are medians of per-round ratios (paired), of memory plain."""
    rows = []
    frozen_held = res["frozen"]["held"]
    for config, r in res["configs"].items():
        label, notes = LABELS[config], r["notes"]

        def cell(d, lib, fmt):
            if lib in d:
                return fmt(d[lib])
            return notes.get(f"{lib} merged") or notes.get(lib) or "—"

        def ratio(d, rounds, key, other):
            if key not in d or other not in d:
                return None
            return paired_ratio(rounds, key, other) if rounds else d[key] / d[other]

        def add(metric, d, fmt, rounds=None, key="vlkit", frozen=None, goal=None, only_peer=None):
            if key not in d:
                return
            peers = [k for k in ("PEFT", "adapters") if k in d and (only_peer is None or k == only_peer)]
            best = min(peers, key=lambda k: d[k]) if peers else None
            vp = ratio(d, rounds, key, best) if best else None
            vf = ratio(d, rounds, key, "frozen") if "frozen" in d else (d[key] / frozen if frozen else None)
            met = ""
            if goal is not None:
                which, limit = goal
                value = vp if which == "peer" else vf
                met = "—" if value is None else ("yes" if value <= limit + 1e-9 else "no")
                goal_text = {"peer": f"<= {limit:g}x {only_peer or 'best peer'}", "frozen": f"<= {limit:g}x frozen",
                             "equal": "= frozen"}[which] if which != "frozen" or limit != 1.0 else "= frozen"
            else:
                goal_text = ""
            fz = d.get("frozen", frozen)
            rows.append([label, metric, fmt(fz) if fz is not None else "", fmt(d[key]), cell(d, "PEFT", fmt),
                         cell(d, "adapters", fmt), f"{vp:.2f}x" + (f" {best}" if best else "") if vp else "—",
                         f"{vf:.2f}x" if vf else "", goal_text, met])

        st, sr = r["step_s"], r["step_rounds"]
        mergeable = config != "bottleneck" and not config.startswith("bottleneck")
        if config == "ia3":
            add("step time", st, ms, sr, goal=("peer", IA3_GOAL), only_peer="PEFT")
        else:
            add("step time", st, ms, sr)
        cached = {**st, "vlkit": st["vlkit + cache"]}
        cached_rounds = {**sr, "vlkit": sr["vlkit + cache"]}
        add("step time, feature cache", cached, ms, cached_rounds,
            goal=("peer", STEP_GOAL) if config.startswith(("lora", "bottleneck")) else None)
        add("step memory", r["step_mem"], mb)
        add("held memory", r["held"], mb, frozen=frozen_held)
        if mergeable and r.get("held_merged"):
            add("held memory, merged", r["held_merged"], mb, frozen=frozen_held, goal=("frozen", 1.0))
        add("latency b1", r["lat1"], ms, r["lat1_rounds"],
            goal=("frozen", LAT1_GOAL) if config.startswith("lora") else None)
        add("latency b32", r["lat32"], ms, r["lat32_rounds"])
        if r.get("lat1_merged"):
            add("latency b1, merged", r["lat1_merged"], ms, r["lat1_merged_rounds"])
            add("latency b32, merged", r["lat32_merged"], ms, r["lat32_merged_rounds"])
    ex = res.get("export")
    if ex:
        ratio_ = ex["vlkit_s"] / ex["bare_s"]
        rows.append(["LoRA all", f"export (eval set {ex['eval_n']})", f"{ex['bare_s']:.1f} s (bare)",
                     f"{ex['vlkit_s']:.1f} s", "—", "—", "—", f"{ratio_:.2f}x bare", f"<= {EXPORT_GOAL:g}x bare",
                     "yes" if ratio_ <= EXPORT_GOAL else "no"])
    return rows


def print_table(res: dict) -> None:
    rows = table_rows(res)
    ex = res.get("export") or {}
    absent = "; ".join(f"{k} absent ({v})" for k, v in res["absent"].items()) or "all peers present"
    vers = ", ".join(f"{k} {v}" for k, v in res["versions"].items())
    print(f"\nvlkit vs PEFT vs adapters: {res['arch']}; training batch {res['batch']} images x 10 class prompts; "
          f"{res['threads']} threads; {vers}; {absent}")
    widths = [max(len(str(x)) for x in col) for col in zip(HEADER, *rows)]
    line = "| " + " | ".join(h.ljust(w) for h, w in zip(HEADER, widths)) + " |"
    print(line)
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows:
        print("| " + " | ".join(str(x).ljust(w) for x, w in zip(r, widths)) + " |")
    if ex.get("timings"):
        parts = ", ".join(f"{k} {v:.1f} s" for k, v in ex["timings"].items() if k != "total")
        print(f"\nvlkit export phases: {parts}; bare torch.onnx.export of {', '.join(ex['graphs'])}: "
              f"{ex['bare_s']:.1f} s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="CI-sized: a small CLIP, few rounds")
    ap.add_argument("--size", choices=list(ARCH), default=None, help="backbone size (default: full on GPU, half on CPU)")
    ap.add_argument("--configs", default=",".join(VLKIT), help=f"comma-separated, of {', '.join(VLKIT)}")
    ap.add_argument("--batch", type=int, default=None, help="training batch (default 16 on CPU, 32 at full size)")
    ap.add_argument("--rounds", type=int, default=None, help="interleaved training-step rounds (default 7)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: 1 on CPU, torch's on GPU)")
    ap.add_argument("--eval-n", type=int, default=None, help="eval-set size of the export (default: vlkit export's)")
    ap.add_argument("--no-export", action="store_true")
    ap.add_argument("--profile", action="store_true", help="print the operator profile of one (IA)^3 step")
    ap.add_argument("--peers-venv", default=str(DEFAULT_VENV), help="environment with adapters 1.3 (made if missing)")
    ap.add_argument("--no-peers-venv", action="store_true", help="run here; peers that do not import are absent")
    ap.add_argument("--json", default=None, help="also write the results to this JSON file")
    ap.add_argument("--absent-reason", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()

    if not os.environ.get(CHILD_ENV) and not args.no_peers_venv and _peer_status()["adapters"] is not None:
        venv = Path(args.peers_venv).resolve()
        why = ensure_peers_venv(venv)
        if why is None:
            env = {**os.environ, CHILD_ENV: "1"}
            py = str(_venv_python(venv))
            os.execve(py, [py, str(Path(__file__).resolve()), *sys.argv[1:]], env)
        print(f"[peers] running without the peers' environment: {why}", file=sys.stderr)
        sys.argv += ["--absent-reason", f"its environment could not be made: {why}"]
        args.absent_reason = f"its environment could not be made: {why}"
    res = run(args)
    print_table(res)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2, default=str))


if __name__ == "__main__":
    main()
