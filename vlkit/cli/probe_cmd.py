"""`vlkit probe NAME`: run a diagnostic probe on the backbone alone and with each adapter, side by side.

    vlkit probe --list
    vlkit probe winoground --backbone tiny --adapters runs/a/adapter,runs/b/adapter,runs/a/adapter+runs/b/adapter
    vlkit probe winoground --data hub --json -o results/ --scores scores.jsonl --plot wino.png
    vlkit probe caption-pairs --data sugarcrepe/ --images coco/val2017

Tables go to stderr, ``--json`` prints the result on stdout. Probes are plugins (`register_probes`); torch
and the probe modules load inside the command.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import typer

from ..options import option_names


def _list_table(probes: list[dict[str, str]]):
    from .output import table

    return table(
        "probes",
        ["name", "plugin", "summary", "--data"],
        [[p["name"], p["plugin"], p["summary"], p["data"]] for p in probes],
    )


def _accepted(probe) -> tuple[set[str], bool]:
    """The options `probe.run` takes (its declared `options_cls`, else its signature's names) and whether it
    takes any other keyword."""
    if probe.options_cls is not None:
        return set(option_names(probe.options_cls)), False
    params = inspect.signature(probe.run).parameters.values()
    return {p.name for p in params}, any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


def register(cli: typer.Typer) -> None:
    @cli.command("probe")
    def probe_cmd(
        name: str | None = typer.Argument(None, help="Probe name (see --list)."),
        list_: bool = typer.Option(False, "--list", help="List the registered probes and exit."),
        backbone: str = typer.Option("tiny", "--backbone", "-b", help="Backbone spec: tiny, open_clip:M@tag, hf:dir."),
        adapters: str | None = typer.Option(
            None,
            "--adapters",
            "-a",
            help="Comma-separated: adapter dirs, a+b stacks, composition dirs. The backbone alone always comes first.",
        ),
        data: str | None = typer.Option(
            None, "--data", "-d", help="Probe data: winoground synth|hub|DIR; caption-pairs FILE.json|DIR."
        ),
        images: Path | None = typer.Option(None, "--images", help="Image root for relative paths in JSON data."),
        n: int | None = typer.Option(
            None, "-n", "--n", help="Examples (synth: generated; Winoground copy: first n; JSON: seeded subset)."
        ),
        seed: int = typer.Option(0, "--seed", help="Seed of the bootstrap resamples."),
        data_seed: int | None = typer.Option(
            None, "--data-seed", help="Seed of generated (synth) data and of JSON subsets [default: 0]."
        ),
        bootstrap: int = typer.Option(1000, "--bootstrap", help="Bootstrap resamples for the intervals."),
        level: float = typer.Option(0.95, "--level", help="Confidence level of the intervals."),
        batch_size: int | None = typer.Option(None, "--batch-size", help="Examples scored per batch."),
        device: str | None = typer.Option(None, "--device", help="cpu, cuda, cuda:1, mps (default: auto)."),
        json_out: bool = typer.Option(False, "--json", help="Print the result as JSON on stdout."),
        out: Path | None = typer.Option(None, "--out", "-o", help="Directory for the result file."),
        overwrite: bool = typer.Option(False, "--overwrite", help="Replace a result file of the same name."),
        scores: Path | None = typer.Option(None, "--scores", help="Write per-example scores (JSONL) here."),
        plot: Path | None = typer.Option(None, "--plot", help="Draw the grouped bar chart to FILE.png."),
        no_progress: bool = typer.Option(False, "--no-progress", help="No progress bar."),
    ) -> None:
        """Probe the backbone and adapters: Winoground, caption-pair (ARO/SugarCrepe) and plugin probes."""
        from ..errors import ConfigError, UnknownNameError
        from ..probe.base import list_probes
        from .output import console, print_json

        probes = list_probes()
        if list_:
            console.print(_list_table(probes))
            if json_out:
                print_json(probes)
            return
        known = [p["name"] for p in probes]
        if name is None or name not in known:
            console.print(_list_table(probes))
            if name is None:
                raise ConfigError("give a probe name, e.g. `vlkit probe winoground`")
            raise UnknownNameError("probe", name, known)
        if bootstrap < 1:
            raise ConfigError(f"--bootstrap must be at least 1, got {bootstrap}")
        if not 0.0 < level < 1.0:
            raise ConfigError(f"--level must be in (0, 1), got {level}")
        if n is not None and n < 1:
            raise ConfigError(f"-n must be at least 1, got {n}")
        if batch_size is not None and batch_size < 1:
            raise ConfigError(f"--batch-size must be at least 1, got {batch_size}")
        if overwrite and out is None:
            raise ConfigError("--overwrite replaces the result file in --out DIR; without --out nothing is written")
        if plot is not None and plot.suffix.lower() not in (".png", ".svg", ".pdf"):
            raise ConfigError(f"--plot needs a .png, .svg or .pdf file name, got {plot.name}")

        import datasets

        datasets.disable_progress_bars()
        from ..backbones.loading import load_backbone
        from ..probe.base import get_probe, public_result
        from ..probe.report import plot_result, write_result_file, write_scores_file
        from ..probe.systems import resolve_systems
        from .probe_tables import print_report
        from .progress import count_progress

        probe = get_probe(name)
        bb = load_backbone(backbone, device=device)
        systems = resolve_systems(bb, adapters)
        options: dict[str, Any] = {"data": data, "seed": seed, "n": n, "n_boot": bootstrap, "level": level}
        named, var_kw = _accepted(probe)
        optional = {
            "data_seed": data_seed,
            "batch_size": batch_size,
            "image_root": str(images) if images is not None else None,
        }
        for key, value in optional.items():
            if value is None:
                continue
            if key not in named and not var_kw:
                raise ConfigError(f"probe {name!r} has no option {key.replace('_', '-')!r}")
            options[key] = value
        start, bar = count_progress(console, not no_progress)
        if start is not None and "progress" in inspect.signature(probe.run).parameters:
            options["progress"] = start
        with bar:
            result = probe.run(bb, systems, **options)

        print_report(result, console)
        if out is not None:
            path = write_result_file(result, out, overwrite=overwrite)
            console.print(f"wrote {path}")
        if scores is not None:
            console.print(f"wrote per-example scores to {write_scores_file(result, scores)}")
        if plot is not None:
            console.print(f"wrote plot {plot_result(result, plot)}")
        if json_out:
            print_json(public_result(result))
