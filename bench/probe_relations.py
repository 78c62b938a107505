"""Bag-of-words behaviour on the embedded world, and an adapter trained on relation-rich data.

1. Probes the backbone on the world's Winoground-style minimal pairs (``vlkit probe winoground --data synth``):
   CLIP-style models score the two captions of a pair (same words, different order) almost alike, so the text
   score sits near or below chance, most of all where only a relation or an attribute moves (Relation).
2. Trains a LoRA adapter on relation-rich minimal pairs from a *disjoint* seed of the same generator — only the
   kinds Winoground tags Relation (colour/size swaps, preposition swaps, numerals) and Both (noun + preposition)
   — with a contrastive loss over the batch plus, within each pair, a two-way loss (the right caption of
   the two for each image, the right image for each caption): the partner is the hard negative, as NegCLIP
   adds swapped captions. Object pairs (noun swaps) are never trained on.
3. Probes backbone and adapter side by side: scores with 95% bootstrap intervals, paired intervals of the
   difference, breakdowns by collapsed tag; also the synth relation/attribute-swap caption-pair probes.

    python bench/probe_relations.py [--backbone tiny] [--steps 600] [--out runs/probe-relations] [--json r.json]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TRAIN_KINDS = ("adj_colour", "adj_size", "preposition", "numeral", "noun_preposition")
TRAIN_SEED = 4242  # the probe's synth data uses seed 0; training pairs come from another seed


def train_relation_adapter(backbone_spec: str, out: Path, n_pairs: int, steps: int, batch_pairs: int, lr: float,
                           seed: int, log) -> Path:
    import torch
    import torch.nn.functional as F

    import vlkit
    from vlkit.world.probes import synth_pairs

    torch.manual_seed(seed)
    bb = vlkit.load_backbone(backbone_spec)
    t0 = time.time()
    pairs = list(synth_pairs(TRAIN_KINDS, n_pairs, seed=TRAIN_SEED))
    pixels = bb.preprocess_batch([p[f"image_{k}"] for p in pairs for k in (0, 1)])
    tokens = bb.tokenize([p[f"caption_{k}"] for p in pairs for k in (0, 1)])
    log(f"generated {n_pairs} training pairs ({', '.join(TRAIN_KINDS)}) in {time.time() - t0:.0f}s")
    vlkit.inject(bb, "lora", name="relations", rank=8, alpha=16)
    params = [p for p in bb.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    scale = float(bb.logit_scale)
    g = torch.Generator().manual_seed(seed)
    bb.train()
    t0 = time.time()
    for step in range(1, steps + 1):
        idx = torch.randperm(n_pairs, generator=g)[:batch_pairs]
        rows = torch.stack([2 * idx, 2 * idx + 1], dim=1).flatten()  # both images and captions of each pair
        img = bb.encode_image(pixels[rows], normalize=True)
        txt = bb.encode_text(tokens[rows], normalize=True)
        logits = scale * img @ txt.T
        target = torch.arange(len(rows))
        loss = 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))
        # within each pair: the right caption of the two for each image, the right image for each caption
        pair = logits.view(len(idx), 2, len(idx), 2).diagonal(dim1=0, dim2=2).permute(2, 0, 1)  # (B, img, txt)
        two = torch.arange(2).repeat(len(idx))
        loss = loss + 0.5 * (F.cross_entropy(pair.reshape(-1, 2), two)
                             + F.cross_entropy(pair.transpose(1, 2).reshape(-1, 2), two))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 50 == 0 or step == steps:
            log(f"step {step}/{steps} loss {loss.item():.3f} ({time.time() - t0:.0f}s)")
    bb.eval()
    return vlkit.save_adapter(bb, out / "adapter", name="relations",
                              extra={"trained_on": {"kinds": list(TRAIN_KINDS), "pairs": n_pairs,
                                                    "seed": TRAIN_SEED, "steps": steps}})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbone", default="tiny")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--pairs", type=int, default=2000, help="training minimal pairs")
    ap.add_argument("--batch-pairs", type=int, default=32)
    ap.add_argument("--lr", type=float, default=5e-3)
    ap.add_argument("-n", type=int, default=400, help="probe examples")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="runs/probe-relations")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--json", default=None, help="also write all results to this JSON file")
    args = ap.parse_args()

    import datasets
    import torch

    datasets.disable_progress_bars()
    torch.set_num_threads(args.threads)
    from vlkit.cli.output import console
    from vlkit.probe import run_probe
    from vlkit.probe.base import public_result
    from vlkit.cli.probe_tables import print_report
    from vlkit.probe.report import plot_result, write_result_file

    out = Path(args.out)
    adapter = train_relation_adapter(args.backbone, out, args.pairs, args.steps, args.batch_pairs, args.lr,
                                     args.seed, lambda m: console.print(f"[dim]{m}[/]"))
    results = {}
    for probe in ("winoground", "synth-relation-swap", "synth-attribute-swap"):
        r = run_probe(probe, backbone=args.backbone, adapters=str(adapter), n=args.n, seed=args.seed)
        print_report(r, console)
        console.print(f"wrote {write_result_file(r, out)}")
        results[probe] = public_result(r)
    console.print(f"wrote {plot_result(results['winoground'], out / 'winoground.png')}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
