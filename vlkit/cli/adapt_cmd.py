"""`vlkit adapt`: few-shot domain adaptation with in-domain and general-domain (retention) scores."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def register(cli: typer.Typer) -> None:
    @cli.command("adapt")
    def adapt_cmd(
        backbone: str = typer.Option("tiny", "--backbone", "-b", help="Backbone spec."),
        domain: str = typer.Option("medical", "--domain", help="Target domain of the embedded world."),
        shots: int = typer.Option(16, "--shots", help="Training examples per class."),
        out: Path = typer.Option(Path("runs/adapt"), "--out", "-o", help="Adapter directory."),
        variant: str = typer.Option("bottleneck", "--adapter", "-a", help="Adapter variant."),
        baselines: Optional[str] = typer.Option(None, "--baselines", help="Also run: full,linear."),
        steps: Optional[int] = typer.Option(None, "--steps", help="Training steps (default: 6 x shots, >= 60)."),
        seed: int = typer.Option(0, "--seed"),
        option: Optional[list[str]] = typer.Option(None, "--option", "-O", help="Adapter option key=value."),
        json_out: bool = typer.Option(False, "--json", help="Print the result as JSON on stdout."),
        overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty output directory."),
    ) -> None:
        """Train a domain adapter on k shots per class and print in-domain and retention scores."""
        from ..train.adapt import run_adapt
        from .common import parse_kv
        from .output import console, print_json, table

        base = tuple(b.strip() for b in (baselines or "").split(",") if b.strip())
        from .progress import TrainProgress

        bar = TrainProgress()
        try:
            res = run_adapt(backbone, domain, shots, out, variant, base, steps, seed,
                            adapter_options=parse_kv(option), progress=bar, overwrite=overwrite)
        finally:
            bar.close()

        def f(v):
            return "—" if v is None else f"{v:.1f}"

        rows = []
        for r in res["rows"]:
            note = ""
            if "verified_unchanged" in r:
                note = "identical to frozen ✓" if r["verified_unchanged"] else "DIFFERS from frozen ✗"
            if "forgetting" in r:
                note = f"forgetting {r['forgetting']:.1f}"
            rows.append([r["method"], f"{r['trainable_percent']:.2f}%", f(r["in_domain"]), f(r["general"]),
                         f"{r['general_change']:+.1f}", note])
        console.print(table(f"{res['domain']} adaptation, {res['shots']} shots/class — accuracy %",
                            ["method", "trainable", res["domain"], f"{res['general_domain']} (general)",
                             "Δ general", "note"], rows))
        console.print(f"adapter written to {res['adapter_dir']}")
        if json_out:
            print_json(res)
