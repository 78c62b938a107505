"""Quality of the shipped tiny CLIP, and of the generative tiny-vl, on held-out scenes of the embedded world.

Zero-shot shape and colour recognition on `photo` (the pre-training domain), image-text retrieval
recall@1 on `photo`, and zero-shot classification on every other domain (the domain gap `vlkit adapt`
has to close). All numbers from this one run.

    python bench/tiny_backbone.py [--weights PATH.safetensors] [-n 500] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

EVAL_SEED = 424242


def zero_shot(backbone, ds, column: str, names: list[str], prompt: str) -> float:
    from vlkit.tasks.classification import ClassificationTask

    if column != "label":
        ds = ds.remove_columns("label").rename_column(column, "label")
    task = ClassificationTask(backbone, ds, class_names=names, prompt=prompt)
    data = task.prepare(backbone, ds)
    return task.evaluate(backbone, data)["accuracy"]


def measure(spec: str, n: int) -> dict:
    import torch

    from vlkit import load_backbone, world
    from vlkit.tasks.retrieval import RetrievalTask

    torch.set_grad_enabled(False)
    bb = load_backbone(spec)
    out: dict = {"backbone": spec}
    photo = world.generate("photo", "classification", n, seed=EVAL_SEED)
    out["photo_shape_zero_shot"] = zero_shot(bb, photo, "label", world.class_names("photo"), "a photo of a {}")
    out["photo_colour_zero_shot"] = zero_shot(bb, photo, "colour", world.colour_names("photo"),
                                              "a photo of a {} shape")
    out["photo_shape_chance"] = 100.0 / len(world.class_names("photo"))
    out["photo_colour_chance"] = 100.0 / len(world.colour_names("photo"))
    ret = world.generate("photo", "retrieval", n, seed=EVAL_SEED)
    rt = RetrievalTask(bb, ret)
    out["photo_retrieval"] = rt.evaluate(bb, rt.prepare(bb, ret))
    for domain in world.DOMAINS:
        if domain == "photo":
            continue
        ds = world.generate(domain, "classification", n, seed=EVAL_SEED)
        out[f"{domain}_zero_shot"] = zero_shot(bb, ds, "label", world.class_names(domain), world.class_prompt(domain))
        out[f"{domain}_chance"] = 100.0 / len(world.class_names(domain))
    return out


def measure_vl(spec: str, n: int) -> dict:
    """`tiny-vl` on held-out photo scenes: captioning CIDEr-D and BLEU-4, open-ended VQA accuracy."""
    import torch

    from vlkit import load_backbone, world
    from vlkit.plugins import registry

    torch.set_grad_enabled(False)
    bb = load_backbone(spec)
    out: dict = {"backbone": spec}
    for task_name, kind in (("captioning", "captioning"), ("vqa-gen", "vqa-gen")):
        ds = world.generate("photo", kind, n, seed=EVAL_SEED)
        task = registry("task").get(task_name)(bb, ds)
        out[task_name] = task.evaluate(bb, task.prepare(bb, ds), batch_size=100)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--weights", default=None, help="tiny weights (.safetensors); default: the shipped ones")
    ap.add_argument("-n", type=int, default=500)
    ap.add_argument("--json", default=None)
    ap.add_argument("--vl", default="tiny-vl", help="generative backbone to measure too (none: skip)")
    args = ap.parse_args()
    spec = f"tiny@{args.weights}" if args.weights else "tiny"
    res = measure(spec, args.n)

    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"tiny CLIP ({spec}) on {args.n} held-out scenes per row")
    for c in ("measure", "score %", "chance %"):
        t.add_column(c)
    t.add_row("photo: zero-shot shape", f"{res['photo_shape_zero_shot']:.1f}", f"{res['photo_shape_chance']:.1f}")
    t.add_row("photo: zero-shot colour", f"{res['photo_colour_zero_shot']:.1f}", f"{res['photo_colour_chance']:.1f}")
    r = res["photo_retrieval"]
    t.add_row("photo: retrieval i2t R@1 / t2i R@1", f"{r['i2t_r1']:.1f} / {r['t2i_r1']:.1f}", f"{100 / args.n:.1f}")
    t.add_row("photo: retrieval mean recall (R@1,5,10)", f"{r['mean_recall']:.1f}", "")
    for d in ("medical", "satellite", "sketch"):
        t.add_row(f"{d}: zero-shot classification", f"{res[f'{d}_zero_shot']:.1f}", f"{res[f'{d}_chance']:.1f}")
    Console(width=160).print(t)
    if args.vl != "none":
        vl = measure_vl(args.vl, args.n)
        res["vl"] = vl
        t = Table(title=f"{args.vl} on {args.n} held-out photo scenes per row")
        for c in ("measure", "score"):
            t.add_column(c)
        cap = vl["captioning"]
        t.add_row("photo: captioning CIDEr-D x 100", f"{cap['cider']:.1f}")
        t.add_row("photo: captioning BLEU-4 x 100", f"{cap['bleu4']:.1f}")
        t.add_row("photo: open-ended VQA accuracy %", f"{vl['vqa-gen']['accuracy']:.1f}")
        Console(width=160).print(t)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
