"""`vlkit export`: write a backbone with its adapters as deployable graphs, verified against PyTorch at once.

    vlkit export --backbone tiny --adapter runs/med -o out/ [--task classification] [--fp16] [--quantize int8]
                 [--providers CUDAExecutionProvider,CPUExecutionProvider] [--target onnx] [--json]
    vlkit export --format peft --adapter runs/hf-lora -o peft-dir/   # PeftModel.from_pretrained(CLIPModel, dir)

The verification table (max abs difference per graph, precision, input set and output) and the eval-set
scores go to stderr; `--json` prints the summary on stdout. A failed check exits with code 2 and writes
nothing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer


def _providers(values: list[str] | None) -> list[str] | None:
    if not values:
        return None
    out = [p.strip() for v in values for p in v.split(",") if p.strip()]
    return out or None


def _fmt(x: Any) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.2e}" if x < 0.01 or x >= 1000 else f"{x:.4f}"
    return str(x)


def _table(title: str, columns: list[str], rows: list[list[Any]]):
    """A compact table (no vertical rules) so the verification fits an 80-column terminal."""
    from rich import box
    from rich.table import Table

    t = Table(title=title, box=box.SIMPLE_HEAD, pad_edge=False)
    for c in columns:
        t.add_column(c, no_wrap=True)
    for r in rows:
        t.add_row(*[str(x) for x in r])
    return t


def _wide(console):
    """The console for tables: itself on a terminal; 100 columns on a pipe or log (rich would assume 80)."""
    if console.is_terminal or console.width >= 100:
        return console
    from rich.console import Console

    return Console(stderr=True, width=100)


def checks_table(summary: dict[str, Any]):
    rows = []
    for c in summary.get("checks", []):
        ok = "[green]ok[/]" if c["passed"] else "[red]FAIL[/]"
        if not c["required"]:
            ok = "[dim]info[/]"  # int8: reported with the score change, not enforced
        rows.append(
            [
                c["graph"],
                c["precision"],
                c["inputs"],
                c["batch"],
                c["output"],
                _fmt(c["max_abs_diff"]),
                _fmt(c["tolerance"]),
                ok,
            ]
        )
    providers = sorted({c["provider"] for c in summary.get("checks", []) if c.get("provider")})
    title = f"verification against PyTorch ({', '.join(providers) or 'onnxruntime'})"
    return _table(title, ["graph", "prec", "inputs", "n", "output", "max|diff|", "tol", ""], rows)


def scores_table(summary: dict[str, Any]):
    rows = [
        [r["precision"], r["metric"], f"{r['value']:.2f}", f"{r['delta']:+.2f}", f"{r['agreement']:.1f}%", r["n"]]
        for r in summary.get("scores", [])
    ]
    dataset = summary.get("manifest", {}).get("eval", {}).get("dataset", "eval set")
    return _table(f"eval-set score ({dataset})", ["graph", "metric", "value", "change", "same pred.", "n"], rows)


def _export_peft(
    out: Path, adapter: list[str] | None, backbone: str | None, overwrite: bool, json_out: bool, seed: int | None
) -> None:
    """`--format peft`: one adapter as a PEFT directory (vlkit.export.peft.export_peft)."""
    from ..errors import ConfigError
    from ..export.peft import export_peft
    from .output import console, print_json

    if not adapter or len(adapter) != 1:
        raise ConfigError("--format peft writes one adapter: give exactly one --adapter directory")
    with console.status("writing the PEFT directory and loading it with PEFT…"):
        summary = export_peft(out, adapter[0], backbone=backbone, overwrite=overwrite, seed=seed or 0)
    worst = ", ".join(f"{k} {v:.2e}" for k, v in summary["max_abs_diff"].items())
    console.print(
        f"verified with peft.PeftModel (max |diff| {worst}); wrote a PEFT {summary['variant']} adapter "
        f"({summary['modules']} modules) to {out}"
    )
    if json_out:
        print_json(summary)


def register(cli: typer.Typer) -> None:
    @cli.command("export")
    def export_cmd(
        out: Path = typer.Option(..., "--out", "-o", help="Output directory for the graphs and export.json."),
        adapter: list[str] | None = typer.Option(
            None, "--adapter", "-a", help="Adapter or composition directory (repeat to stack)."
        ),
        backbone: str | None = typer.Option(
            None, "--backbone", "-b", help="Backbone spec (default: the one the adapter names)."
        ),
        target: str | None = typer.Option(
            None, "--target", "-t", help="Export target (see `vlkit plugins`; default onnx)."
        ),
        fmt: str = typer.Option(
            "graphs",
            "--format",
            "-f",
            help="graphs: the --target's verified graphs (ONNX by default); peft: one LoRA / "
            "peft adapter of an hf: backbone as a PEFT directory "
            "(PeftModel.from_pretrained loads it), verified through PEFT.",
        ),
        task: str | None = typer.Option(None, "--task", help="Add a task head graph: classification."),
        domain: str | None = typer.Option(
            None,
            "--domain",
            help="World domain of the eval set, and of the class names when the "
            "adapter saved none (default: the recipe's, else photo).",
        ),
        eval_data: str | None = typer.Option(
            None, "--eval-data", help="Eval set data spec (default: the recipe's or the world's classification set)."
        ),
        eval_n: int | None = typer.Option(
            None,
            "--eval-n",
            help="At most this many eval examples (default 16; 256 with --fp16 "
            "or --quantize, whose score change is what they are judged by).",
        ),
        fp16: bool = typer.Option(False, "--fp16", help="Also write float16 graphs (fp32 inputs and outputs)."),
        quantize: str | None = typer.Option(None, "--quantize", help="Also write quantised graphs: int8."),
        providers: list[str] | None = typer.Option(
            None, "--providers", help="onnxruntime execution providers, comma-separated."
        ),
        opset: int | None = typer.Option(None, "--opset", help="ONNX opset (default 17)."),
        no_merge: bool = typer.Option(False, "--no-merge", help="Keep LoRA-like adapters as operators."),
        merge_unload: bool = typer.Option(
            False,
            "--merge",
            help="Fold the adapters into the weights for good (no copy kept for "
            "an exact unmerge: the frozen backbone's memory); all must merge.",
        ),
        seed: int | None = typer.Option(None, "--seed", help="Seed of the random verification inputs."),
        option: list[str] | None = typer.Option(None, "--option", "-O", help="Target option key=value."),
        json_out: bool = typer.Option(False, "--json", help="Print the summary as JSON on stdout."),
        overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty output directory."),
    ) -> None:
        """Export backbone + adapters to graphs that run without PyTorch; verify them against PyTorch."""
        from ..errors import ExportError
        from ..export.api import export_model
        from ..export.base import ExportOptions
        from .common import parse_kv
        from .output import console, print_json

        if fmt == "peft":
            graph_only = {
                "--target": target,
                "--task": task,
                "--domain": domain,
                "--eval-data": eval_data,
                "--eval-n": eval_n,
                "--fp16": fp16 or None,
                "--quantize": quantize,
                "--providers": providers or None,
                "--opset": opset,
                "--no-merge": no_merge or None,
                "--merge": merge_unload or None,
                "--option": option or None,
            }
            unused = [k for k, v in graph_only.items() if v is not None]
            if unused:
                from ..errors import ConfigError

                raise ConfigError(
                    f"{', '.join(unused)} {'does' if len(unused) == 1 else 'do'} not apply to "
                    "--format peft (a PEFT directory, verified with peft itself)"
                )
            _export_peft(out, adapter, backbone, overwrite, json_out, seed)
            return
        if fmt not in ("graphs", "onnx"):
            from ..errors import ConfigError

            raise ConfigError(f"--format must be graphs or peft, got {fmt!r}")
        options = ExportOptions(
            fp16=fp16,
            quantize=quantize,
            providers=_providers(providers),
            opset=opset,
            seed=seed,
            extra=parse_kv(option),
        )
        try:
            with console.status("exporting and verifying…"):
                summary = export_model(
                    out,
                    backbone=backbone,
                    adapters=list(adapter or []),
                    target=target or "onnx",
                    task=task,
                    domain=domain,
                    eval_data=eval_data,
                    eval_n=eval_n,
                    merge=not no_merge,
                    options=options,
                    overwrite=overwrite,
                    unload=merge_unload,
                )
        except ExportError as exc:
            if exc.summary:
                _wide(console).print(checks_table(exc.summary))
            raise
        _wide(console).print(checks_table(summary))
        if summary.get("scores"):
            _wide(console).print(scores_table(summary))
        for note in summary.get("notes", []):
            console.print(f"[dim]note: {note}[/]")
        worst = ", ".join(f"{p} {d:.2e}" for p, d in summary["max_abs_diff"].items())
        merged = f"; merged into the weights: {', '.join(summary['merged'])}" if summary["merged"] else ""
        console.print(f"verified (max |diff| {worst}){merged}; wrote {len(summary['written'])} files to {out}")
        if json_out:
            print_json({k: v for k, v in summary.items() if k != "manifest"})
