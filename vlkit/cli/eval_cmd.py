"""`vlkit eval`: score the frozen backbone and adapters (stacks, compositions, routers) on a dataset.

    vlkit eval --backbone tiny --adapters runs/sat,runs/med --data coop:DIR --task classification [--json]
    vlkit eval --adapters runs/sat --data manifest:val.jsonl --task retrieval
    vlkit eval --adapters runs/sat --data world:satellite/classification --alpha 0,0.25,0.5,0.75,1 \\
        --general world:photo/classification --templates imagenet
    vlkit eval --adapters runs/sat --data world:satellite/classification --data world:sketch/classification

One table on stderr (rows: the backbone, then each adapter argument; columns: the task's metrics with
bootstrap intervals and the paired difference of the primary metric to the backbone; with several ``--data``,
one column group per dataset: its primary metric and that difference); ``--json`` prints the result on stdout,
``-o FILE`` writes it. The engine is `vlkit.train.evaluate.run_eval`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer


def _cell(value: Any, interval: list[float] | None = None) -> str:
    if value is None:
        return "—"
    text = f"{value:.2f}"
    return f"{text} [{interval[0]:.1f}, {interval[1]:.1f}]" if interval else text


def _delta(d: dict[str, float] | None) -> str:
    return "—" if d is None else f"{d['value']:+.2f} [{d['low']:+.1f}, {d['high']:+.1f}]"


def datasets_table(res: dict[str, Any]):
    """A several-dataset result as one table: a row per system; per dataset its primary metric and the difference
    to the backbone; then the general score and retention when asked for."""
    from .output import table

    primary, parts = res["metric"], res["datasets"]
    columns = ["model"]
    for part in parts:
        where = part["data"] + (f" ({part['split']})" if part.get("split") else "")
        columns += [f"{where}: {primary} (n={part['n']})", f"{where}: Δ"]
    general = "general" in parts[0]
    if general:
        columns += [f"general {primary}", "retention %"]
    rows = []
    for i, first in enumerate(parts[0]["rows"]):
        cells = [first["label"]]
        for part in parts:
            r = part["rows"][i]
            cells += [_cell(r["metrics"].get(primary), r.get("intervals", {}).get(primary)), _delta(r.get("delta"))]
        if general:
            cells += [_cell(first.get("general")), _cell(first.get("retention"))]
        rows.append(cells)
    b = res["bootstrap"]
    note = f", {b['level'] * 100:g}% bootstrap intervals over {b['resamples']} resamples" if b["resamples"] else ""
    return table(f"{res['task']} on {len(parts)} datasets ({res['backbone']}){note}", columns, rows)


def result_table(res: dict[str, Any]):
    """The result as one rich table: a row per system, a column per metric (`datasets_table` for several)."""
    from .output import table

    if "datasets" in res:
        return datasets_table(res)
    metrics = list(dict.fromkeys(m for r in res["rows"] for m in r["metrics"]))
    primary = res["metric"]
    columns = ["model", *metrics, f"Δ {primary} vs backbone"]
    general = "general" in res
    if general:
        columns += [f"general {primary}", "retention %"]
    rows = []
    for r in res["rows"]:
        iv = r.get("intervals", {})
        d = r.get("delta")
        cells = [
            r["label"],
            *(_cell(r["metrics"].get(m), iv.get(m)) for m in metrics),
            _delta(d),
        ]
        if general:
            cells += [_cell(r.get("general")), _cell(r.get("retention"))]
        rows.append(cells)
    b = res["bootstrap"]
    where = res["data"] + (f" ({res['split']})" if res.get("split") else "")
    note = f", {b['level'] * 100:g}% bootstrap intervals over {b['resamples']} resamples" if b["resamples"] else ""
    return table(f"{res['task']} on {where}, n={res['n']} ({res['backbone']}){note}", columns, rows)


def register(cli: typer.Typer) -> None:
    @cli.command("eval")
    def eval_cmd(
        data: list[str] = typer.Option(
            ...,
            "--data",
            "-d",
            help="Data spec: coop:DIR, manifest:FILE, world:DOMAIN/TASK, imagefolder:DIR, hf:ID, a local path; "
            "repeat it to score several datasets (a column group each).",
        ),
        task: str = typer.Option("classification", "--task", "-t", help="Task whose metrics to report."),
        backbone: str = typer.Option("tiny", "--backbone", "-b", help="Backbone spec."),
        adapters: str | None = typer.Option(
            None,
            "--adapters",
            "-a",
            help="Comma-separated: adapter dirs, a+b stacks, composition dirs (any mode, "
            "routers too). The backbone alone always comes first.",
        ),
        split: str | None = typer.Option(None, "--split", help="Split to score [default: test where there is one]."),
        prompt: str | None = typer.Option(None, "--prompt", help="classification: prompt template with one {}."),
        templates: str | None = typer.Option(
            None, "--templates", help="classification: a prompt ensemble: imagenet (CLIP's 80), photo, or a file."
        ),
        option: list[str] | None = typer.Option(None, "--option", "-O", help="Task option key=value."),
        alpha: str | None = typer.Option(
            None, "--alpha", help="WiSE sweep, e.g. 0,0.5,1: each single adapter also at these strengths."
        ),
        general: str | None = typer.Option(
            None,
            "--general",
            help="General-domain data spec: every row also reports its score there and its retention.",
        ),
        bootstrap: int = typer.Option(1000, "--bootstrap", help="Bootstrap resamples (0: no intervals)."),
        level: float = typer.Option(0.95, "--level", help="Confidence level of the intervals."),
        seed: int = typer.Option(0, "--seed", help="Seed of the bootstrap resamples."),
        batch_size: int = typer.Option(256, "--batch-size", help="Examples per batch."),
        device: str | None = typer.Option(None, "--device", help="cpu, cuda, cuda:1, mps (default: auto)."),
        json_out: bool = typer.Option(False, "--json", help="Print the result as JSON on stdout."),
        out: Path | None = typer.Option(None, "--out", "-o", help="Write the result as JSON to FILE."),
        overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --out file."),
    ) -> None:
        """Evaluate the backbone and each adapter on a dataset: the task's metrics with bootstrap intervals."""
        from ..errors import ConfigError
        from ..io import write_json
        from ..train.evaluate import parse_alphas, run_eval
        from .common import parse_kv
        from .output import console, print_json

        if overwrite and out is None:
            raise ConfigError("--overwrite replaces the --out FILE; without --out nothing is written")
        if out is not None and out.exists() and not overwrite:
            raise ConfigError(f"{out} exists", hint="pass --overwrite to replace it")
        if out is not None and out.is_dir():
            raise ConfigError(f"--out {out} is a directory; give a file name")
        if batch_size < 1:
            raise ConfigError(f"--batch-size must be at least 1, got {batch_size}")
        options: dict[str, Any] = parse_kv(option)
        for key, value in (("prompt", prompt), ("templates", templates)):
            if value is not None:
                if key in options:
                    raise ConfigError(f"--{key} and -O {key}=... both given")
                options[key] = value
        with console.status("evaluating…") as status:
            res = run_eval(
                backbone,
                adapters,
                data=data[0] if len(data) == 1 else list(data),
                task=task,
                options=options,
                split=split,
                alphas=parse_alphas(alpha),
                general=general,
                bootstrap=bootstrap,
                level=level,
                seed=seed,
                batch_size=batch_size,
                device=device,
                progress=lambda label: status.update(label),
            )
        console.print(result_table(res))
        if out is not None:
            write_json(out, res)
            console.print(f"result written to {out}")
        if json_out:
            print_json(res)
