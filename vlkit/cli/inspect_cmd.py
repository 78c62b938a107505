"""`vlkit inspect ADAPTER_DIR`: config, parameter count and, for fusion adapters, gate values per layer."""

from __future__ import annotations

from pathlib import Path

import typer


def register(cli: typer.Typer) -> None:
    @cli.command("inspect")
    def inspect_cmd(
        adapter: Path = typer.Argument(..., help="Adapter directory."),
        plot: Path | None = typer.Option(
            None, "--plot", help="PNG bar chart of the gates (default for fusion adapters: ADAPTER_DIR/gates.png)."
        ),
        json_out: bool = typer.Option(False, "--json", help="Print JSON on stdout."),
    ) -> None:
        """Show what an adapter holds; for fusion adapters where it leans on the other modality."""
        from ..adapters.inspect import inspect_adapter, plot_gates
        from .output import console, print_json, table

        info = inspect_adapter(adapter)
        rows = [
            ["variant", info["variant"]],
            ["backbone", f"{info['backbone']} ({info['backbone_fingerprint']})"],
            ["parameters", f"{info['parameters']:,}"],
            ["sites", info["sites"]],
            ["task", info["task"].get("name", "—") if info["task"] else "—"],
        ]
        rows += [[f"parameters: {t}", f"{n:,}"] for t, n in info["parameters_per_tower"].items()]
        rows += [[f"config.{k}", v] for k, v in info["config"].items() if v not in (None, [], "")]
        console.print(table(f"adapter {info['name']} — {adapter}", ["field", "value"], rows))
        if info.get("summary"):
            console.print(table(f"{info['variant']} state", ["what", "value"], info["summary"]))
        if info.get("state"):
            console.print(
                table(
                    "tensors by name",
                    ["tensor", "count", "shape", "elements", "mean |x|", "rms"],
                    [
                        [
                            r["tensor"],
                            r["tensors"],
                            "×".join(map(str, r["shape"])) or "scalar",
                            f"{r['elements']:,}",
                            f"{r['mean_abs']:.4g}",
                            f"{r['rms']:.4g}",
                        ]
                        for r in info["state"]
                    ],
                )
            )
        if info["gates"]:
            console.print(
                table(
                    "cross-modal gates: tanh(gate), mean over channels",
                    ["tower", "layer", "site", "gate", "|gate|", "channels"],
                    [
                        [g["tower"], g["layer"], g["role"], f"{g['gate']:+.4f}", f"{g['gate_abs']:.4f}", g["channels"]]
                        for g in info["gates"]
                    ],
                )
            )
            out = plot or (Path(adapter) / "gates.png")
            plot_gates(info, out)
            info["plot"] = str(out)
            console.print(f"gate chart written to {out}")
        elif plot is not None:
            console.print(f"[yellow]{info['variant']} adapters have no gates; no chart written[/]")
        if json_out:
            print_json(info)
