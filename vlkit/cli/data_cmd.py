"""`vlkit data`: write the procedural world to disk (`generate`) and look at a generated folder (`show`).

Heavy libraries (datasets, PIL, numpy) are imported inside the commands so `vlkit --help` stays fast.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

from .output import console, print_json, table

data_app = typer.Typer(
    help="The procedural image-text world: generate datasets to disk and show them.",
    no_args_is_help=True,
    add_completion=False,
)

_TEXT_COLUMNS = {  # what `show` prints per task, after the index
    "classification": ("label_name", "caption"),
    "retrieval": ("caption",),
    "vqa": ("question", "answer", "answer_type"),
    "grounding": ("expression", "box"),
    "winoground": ("tag", "collapsed_tag", "caption_0", "caption_1"),
}


@data_app.command("generate")
def generate_cmd(
    domain: str = typer.Option("photo", "--domain", help="photo, medical, satellite or sketch."),
    task: str = typer.Option("classification", "--task",
                             help="classification, retrieval, vqa, grounding or winoground."),
    n: int = typer.Option(1000, "-n", "--n", help="Number of examples (pairs for winoground)."),
    seed: int = typer.Option(0, "--seed", help="Seed; the same seed gives the same bytes."),
    image_size: int = typer.Option(64, "--image-size", help="Image side in pixels."),
    out: Path = typer.Option(..., "-o", "--out", help="Output folder (created if missing)."),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON summary on stdout."),
) -> None:
    """Generate a dataset and write PNGs plus a manifest (imagefolder metadata.jsonl or Winoground examples.jsonl)."""
    import time

    world = _world_kind()
    world["check"](domain, task, n, seed, image_size)
    t0 = time.perf_counter()
    ds = world["generate"](domain, task, n, seed=seed, image_size=image_size)
    manifest = world["write"](ds, out, task)
    seconds = time.perf_counter() - t0
    console.print(f"wrote {n} {domain}/{task} examples to {out} ({manifest.name} + images/) in {seconds:.1f}s")
    if as_json:
        print_json({"out": str(out), "manifest": str(manifest), "world_json": str(Path(out) / "world.json"),
                    "domain": domain, "task": task, "n": n, "seed": seed, "image_size": image_size,
                    "columns": ds.column_names, "seconds": round(seconds, 3)})


WORLD_KIND = "world"  # the dataset kind whose registry entry declares what these commands run
WORLD_FUNCTIONS = ("check", "generate", "write", "read", "find_manifest", "contact_sheet")


def _world_kind() -> dict[str, Any]:
    """The functions the world dataset kind declares in its registry entry (the world plugin registers them)."""
    from ..data.kinds import kind_function

    return {key: kind_function(WORLD_KIND, key, "vlkit data") for key in WORLD_FUNCTIONS}


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3f}"
    if isinstance(value, list):
        return "[" + ", ".join(_cell(v) for v in value) + "]"
    return str(value)


def _task_of(directory: Path, manifest: Path, columns: list[str]) -> str:
    import json

    info_path = directory / "world.json"
    if info_path.is_file():
        try:
            task = json.loads(info_path.read_text(encoding="utf-8")).get("task")
            if task in _TEXT_COLUMNS:
                return task
        except ValueError:
            pass
    if manifest.name == "examples.jsonl":
        return "winoground"
    for task in ("vqa", "grounding", "classification"):
        if _TEXT_COLUMNS[task][0] in columns or (task == "classification" and "label" in columns):
            return task
    return "retrieval"


@data_app.command("show")
def show_cmd(
    directory: Path = typer.Argument(..., help="A folder written by `vlkit data generate`."),
    count: int = typer.Option(8, "-k", "--count", help="How many examples to print and draw."),
    out: Optional[Path] = typer.Option(None, "--out", help="Contact sheet PNG [default: DIR/contact_sheet.png]."),
    as_json: bool = typer.Option(False, "--json", help="Print the shown examples as JSON on stdout."),
) -> None:
    """Print a few examples (table on stderr) and write a contact sheet PNG."""
    import json

    from PIL import ImageDraw

    from ..errors import ConfigError

    if count < 1:
        raise ConfigError(f"--count must be at least 1, got {count}")
    world = _world_kind()
    manifest = world["find_manifest"](directory)
    task = _task_of(directory, manifest, [])
    names: list[str] = []
    if task == "classification" and (directory / "world.json").is_file():
        try:
            names = json.loads((directory / "world.json").read_text(encoding="utf-8")).get("class_names") or []
        except ValueError:
            names = []
    ds = world["read"](directory)
    rows = [ds[i] for i in range(min(count, len(ds)))]
    cols = [c for c in _TEXT_COLUMNS[task] if c in ds.column_names or c == "label_name"]
    records, images, captions = [], [], []
    for i, row in enumerate(rows):
        if task == "classification" and "label" in row:
            label = row["label"]
            row["label_name"] = names[label] if 0 <= label < len(names) else str(label)
        records.append({c: row.get(c) for c in cols})
        if task == "winoground":
            images += [row["image_0"], row["image_1"]]
            captions += [f"{row['id']}a: {row['caption_0']}", f"{row['id']}b: {row['caption_1']}"]
            continue
        im = row["image"].convert("RGB")
        if task == "grounding":  # outline the target box
            im = im.resize((im.width * 2, im.height * 2))
            x0, y0, x1, y1 = (v * im.width for v in row["box"])
            ImageDraw.Draw(im).rectangle((x0, y0, x1, y1), outline=(255, 0, 255), width=2)
            text = row["expression"]
        elif task == "vqa":
            text = f"Q: {row['question']} A: {row['answer']}"
        elif task == "classification":
            text = f"[{row['label_name']}] {row['caption']}"
        else:
            text = row["caption"]
        images.append(im)
        captions.append(text)
    sheet = world["contact_sheet"](images, captions, out or directory / "contact_sheet.png",
                                 columns=4)
    console.print(table(f"{directory} ({task}, {len(ds)} examples)", ["#", *cols],
                        [[i, *(_cell(r[c]) for c in cols)] for i, r in enumerate(records)]))
    console.print(f"contact sheet: {sheet}")
    if as_json:
        print_json({"dir": str(directory), "task": task, "n": len(ds), "contact_sheet": str(sheet),
                    "examples": records})


def register(cli: typer.Typer) -> None:
    cli.add_typer(data_app, name="data", help="Procedural image-text world: generate datasets and show them.")
