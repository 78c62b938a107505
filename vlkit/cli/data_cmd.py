"""`vlkit data`: write the procedural world to disk (`generate`) and look at a generated folder (`show`).

Heavy libraries (datasets, PIL, numpy) are imported inside the commands so `vlkit --help` stays fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from ..errors import ConfigError, DataError
from .output import console, print_json, table

data_app = typer.Typer(
    help="The procedural image-text world: generate datasets to disk and show them.",
    no_args_is_help=True,
    add_completion=False,
)


@data_app.command("generate")
def generate_cmd(
    domain: str = typer.Option("photo", "--domain", help="photo, medical, satellite or sketch."),
    task: str | None = typer.Option(
        None,
        "--task",
        help="A task the world generates: classification (default), retrieval, vqa, grounding or winoground.",
    ),
    n: int = typer.Option(1000, "-n", "--n", help="Number of examples (pairs for winoground)."),
    seed: int = typer.Option(0, "--seed", help="Seed; the same seed gives the same bytes."),
    image_size: int = typer.Option(64, "--image-size", help="Image side in pixels."),
    out: Path = typer.Option(..., "-o", "--out", help="Output folder (created if missing)."),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON summary on stdout."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty output folder."),
) -> None:
    """Generate a dataset and write PNGs plus a manifest (imagefolder metadata.jsonl or Winoground examples.jsonl)."""
    import time

    world = _world_kind()
    from ..data.kinds import kind_meta

    task = task or (kind_meta(WORLD_KIND).get("tasks") or [None])[0]
    world["check"](domain, task, n, seed, image_size)
    from ..outputs import OutputTarget

    target = OutputTarget(out, overwrite=overwrite, what="output folder")
    target.check()
    t0 = time.perf_counter()
    ds = world["generate"](domain, task, n, seed=seed, image_size=image_size)
    with target:
        staged = world["write"](ds, target.staging, task)
    manifest = Path(out) / staged.relative_to(target.staging)
    seconds = time.perf_counter() - t0
    console.print(f"wrote {n} {domain}/{task} examples to {out} ({manifest.name} + images/) in {seconds:.1f}s")
    if as_json:
        print_json(
            {
                "out": str(out),
                "manifest": str(manifest),
                "world_json": str(Path(out) / "world.json"),
                "domain": domain,
                "task": task,
                "n": n,
                "seed": seed,
                "image_size": image_size,
                "columns": ds.column_names,
                "seconds": round(seconds, 3),
            }
        )


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


def _declared(name: str):
    """The registered task or probe called `name` (what it declares: required and show columns), or None."""
    from ..plugins import registry

    for kind in ("task", "probe"):
        if name in registry(kind):
            return registry(kind).get(name)
    return None


def _task_of(directory: Path, columns: list[str]) -> str:
    """The task a generated folder was written for (its world.json), else the registered task or probe whose
    required columns the data has, the most specific first (registration order breaks ties)."""
    import json

    from ..plugins import registry

    info_path = directory / "world.json"
    if info_path.is_file():
        try:
            task = json.loads(info_path.read_text(encoding="utf-8")).get("task")
            if isinstance(task, str) and _declared(task) is not None:
                return task
        except ValueError:
            pass
    best, size = None, -1
    for kind in ("task", "probe"):
        for entry in registry(kind):
            need = tuple(entry.obj.required)
            if need and all(c in columns for c in need) and len(need) > size:
                best, size = entry.name, len(need)
    if best is None:
        raise ConfigError(f"{directory}: no registered task reads columns {', '.join(columns)}")
    return best


def _label_names(ds, directory: Path) -> dict[str, list[str]]:
    """Names of the ClassLabel columns of `ds` (world.json's class_names for a plain integer `label`)."""
    import json

    out = {c: list(f.names) for c, f in ds.features.items() if hasattr(f, "names") and f.names}
    if "label" in ds.column_names and "label" not in out and (directory / "world.json").is_file():
        try:
            names = json.loads((directory / "world.json").read_text(encoding="utf-8")).get("class_names")
        except ValueError:
            names = None
        if names:
            out["label"] = list(names)
    return out


@data_app.command("show")
def show_cmd(
    directory: Path = typer.Argument(..., help="A folder written by `vlkit data generate`."),
    count: int = typer.Option(8, "-k", "--count", help="How many examples to print and draw."),
    out: Path | None = typer.Option(None, "--out", help="Contact sheet PNG [default: DIR/contact_sheet.png]."),
    as_json: bool = typer.Option(False, "--json", help="Print the shown examples as JSON on stdout."),
) -> None:
    """Print a few examples (table on stderr) and write a contact sheet PNG."""
    from PIL import ImageDraw

    if count < 1:
        raise ConfigError(f"--count must be at least 1, got {count}")
    world = _world_kind()
    world["find_manifest"](directory)
    ds = world["read"](directory)
    task = _task_of(directory, ds.column_names)
    declared = _declared(task)
    names = _label_names(ds, directory)
    rows = []
    for i in range(min(count, len(ds))):
        try:
            row = ds[i]
            for col in [c for c in ds.column_names if c == "image" or c.startswith("image_")]:
                row[col] = row[col].convert("RGB")  # decodes fully
        except (OSError, SyntaxError, ValueError) as exc:
            raise DataError(f"{directory}: example {i + 1}: its image cannot be decoded ({exc})") from None
        rows.append(row)
    wanted = tuple(getattr(declared, "show_columns", ()) or ())
    cols = [c for c in wanted if c in ds.column_names or (c.endswith("_name") and c[:-5] in names)]
    image_cols = [c for c in ds.column_names if c == "image" or c.startswith("image_")]
    annotate = getattr(declared, "annotate", None)
    records, images, captions = [], [], []
    for i, row in enumerate(rows):
        for col, labels in names.items():
            v = row.get(col)
            if isinstance(v, int) and not isinstance(v, bool):
                row[f"{col}_name"] = labels[v] if 0 <= v < len(labels) else str(v)
        records.append({c: row.get(c) for c in cols})
        for col in image_cols:
            im = row[col].convert("RGB")
            if annotate is not None and len(image_cols) == 1:
                im = im.resize((im.width * 2, im.height * 2))
                annotate(ImageDraw.Draw(im), row, float(im.width))
            suffix = col[len("image") :]
            text_cols = [c for c in cols if c.endswith(suffix)] if suffix else cols
            text = " · ".join(_cell(row[c]) for c in text_cols if row.get(c) is not None)
            label = f"{row.get('id', i)}{'ab'[int(suffix[1:]) % 2] if suffix[1:].isdigit() else ''}"
            images.append(im)
            captions.append(f"{label}: {text}" if suffix else text)
    sheet = world["contact_sheet"](images, captions, out or directory / "contact_sheet.png", columns=4)
    console.print(
        table(
            f"{directory} ({task}, {len(ds)} examples)",
            ["#", *cols],
            [[i, *(_cell(r[c]) for c in cols)] for i, r in enumerate(records)],
        )
    )
    console.print(f"contact sheet: {sheet}")
    if as_json:
        print_json(
            {"dir": str(directory), "task": task, "n": len(ds), "contact_sheet": str(sheet), "examples": records}
        )


def register(cli: typer.Typer) -> None:
    cli.add_typer(data_app, name="data", help="Procedural image-text world: generate datasets and show them.")
