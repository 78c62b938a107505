"""Pre-training `tiny-vl`: captions and questions of the photo world, the image tower frozen (its patch tokens
computed once per image), the projector and the T5 trained. `python -m vlkit.world.pretrain_vl OUT.safetensors`
writes the weights `load_tiny_vl` reads (the shipped `weights/tiny-vl.safetensors` came from the defaults)."""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch

from ..io import save_safetensors
from .tasks import generate
from .tiny_vl import WEIGHTS_PATH, load_tiny_vl

CAPTION_PROMPT = "caption:"
VQA_PROMPT = "vqa: {}"


def pretraining_pairs(n: int, seed: int, image_size: int = 64) -> tuple[list, list[str], list[str]]:
    """(images, prompts, targets): n photo captions and n photo questions with their answers."""
    caps = generate("photo", "retrieval", n, seed=seed, image_size=image_size)
    vqa = generate("photo", "vqa", n, seed=seed, image_size=image_size)
    images = list(caps["image"]) + list(vqa["image"])
    prompts = [CAPTION_PROMPT] * len(caps) + [VQA_PROMPT.format(q) for q in vqa["question"]]
    targets = list(caps["caption"]) + [str(a) for a in vqa["answer"]]
    return images, prompts, targets


def pretrain(
    out: Path,
    *,
    n: int = 4000,
    steps: int = 3000,
    batch_size: int = 64,
    lr: float = 1e-3,
    seed: int = 0,
    log_every: int = 100,
) -> dict:
    torch.manual_seed(seed)
    bb = load_tiny_vl("tiny-vl@init")
    images, prompts, targets = pretraining_pairs(n, seed)
    with torch.no_grad():
        feats = torch.cat(
            [bb.image_features(bb.preprocess_batch(images[i : i + 256])) for i in range(0, len(images), 256)]
        )
    params = [p for name, p in bb.model.named_parameters() if not name.startswith("vision.")]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / max(1, steps))))
    )
    g = torch.Generator().manual_seed(seed)
    bb.train()
    t0, losses = time.time(), []
    for step in range(steps):
        idx = torch.randint(0, len(prompts), (batch_size,), generator=g).tolist()
        loss = bb.loss(feats[idx], [prompts[i] for i in idx], [targets[i] for i in idx])
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(float(loss))
        if log_every and (step + 1) % log_every == 0:
            print(
                f"step {step + 1}/{steps} loss {sum(losses[-log_every:]) / log_every:.3f} ({time.time() - t0:.0f} s)",
                flush=True,
            )
    bb.eval()
    state = {
        k: v.detach().contiguous()
        for k, v in bb.model.state_dict().items()
        if k not in ("lm.encoder.embed_tokens.weight", "lm.decoder.embed_tokens.weight", "lm.lm_head.weight")
    }
    save_safetensors(state, out, metadata={"format": "pt", "steps": str(steps), "seed": str(seed)})
    return {
        "out": str(out),
        "steps": steps,
        "final_loss": sum(losses[-50:]) / min(50, len(losses)),
        "seconds": time.time() - t0,
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("out", nargs="?", default=str(WEIGHTS_PATH))
    ap.add_argument("--n", type=int, default=4000)
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--log-every", type=int, default=100)
    args = ap.parse_args(argv)
    print(
        pretrain(
            Path(args.out),
            n=args.n,
            steps=args.steps,
            batch_size=args.batch_size,
            lr=args.lr,
            seed=args.seed,
            log_every=args.log_every,
        )
    )


if __name__ == "__main__":
    main()
