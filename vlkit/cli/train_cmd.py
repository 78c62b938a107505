"""`vlkit train RECIPE [key=value ...]`: train from a YAML recipe (also under accelerate launch / torchrun)."""

from __future__ import annotations

from pathlib import Path

import typer


def register(cli: typer.Typer) -> None:
    @cli.command("train", context_settings={"allow_extra_args": False})
    def train_cmd(
        recipe: Path = typer.Argument(..., help="Recipe YAML file."),
        overrides: list[str] | None = typer.Argument(None, help="key=value overrides, e.g. optim.lr=3e-4."),
        out: Path | None = typer.Option(None, "--out", "-o", help="Output directory (default: recipe output_dir)."),
        resume: bool = typer.Option(False, "--resume", help="Continue from the newest checkpoint in the output dir."),
        overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty output directory."),
        allow_untrained: bool = typer.Option(
            False, "--allow-untrained", help="Let optim.steps=0 write the adapter as initialised."
        ),
        allow_env: list[str] | None = typer.Option(
            None,
            "--allow-env",
            help="Environment variable the recipe may read with ${oc.env:NAME} (repeat for several).",
        ),
        json_out: bool = typer.Option(False, "--json", help="Print the final metrics as JSON on stdout."),
        no_progress: bool = typer.Option(False, "--no-progress", help="No progress bar."),
    ) -> None:
        """Train adapters (or a baseline) from a recipe; writes the adapter directory and logs."""
        import os

        from ..train.engine import train
        from ..train.recipe import load_recipe
        from .output import console, print_json, table
        from .progress import TrainProgress

        notes: list[str] = []
        cfg = load_recipe(
            recipe, overrides or [], notes=notes, allow_env=tuple(allow_env or ()), allow_untrained=allow_untrained
        )
        if os.environ.get("RANK", "0") == "0":
            for note in notes:
                console.print(f"note: {note}")
        from ..train.launch import cpu_launch_processes, relaunch_under_torchrun

        n_cpu = cpu_launch_processes()
        if n_cpu:
            import sys

            relaunch_under_torchrun(n_cpu, sys.argv[sys.argv.index("train") :] if "train" in sys.argv else ["train"])
        bar = TrainProgress(enabled=not no_progress and os.environ.get("RANK", "0") == "0")
        try:
            result = train(cfg, out, resume=resume, overwrite=overwrite, progress=bar)
        finally:
            bar.close()
        if os.environ.get("RANK", "0") != "0":
            return
        rows = [[k, f"{v:.2f}" if isinstance(v, float) else v] for k, v in result["metrics"].items()]
        p = result["parameters"]
        rows.append(["trainable parameters", f"{p['trainable']:,} ({p['trainable_percent']:.2f}%)"])
        rows.append(["steps", result["steps"]])
        console.print(table(f"{result['name']} — {result['method']} on {result['task']}", ["metric", "value"], rows))
        console.print(f"wrote {result['output_dir']}")
        if json_out:
            print_json(result)
