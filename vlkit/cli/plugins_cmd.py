"""`vlkit plugins`: every plugin, its version and what it registers."""
from __future__ import annotations

import typer


def register(cli: typer.Typer) -> None:
    @cli.command("plugins")
    def plugins(json_out: bool = typer.Option(False, "--json", help="Print JSON on stdout.")) -> None:
        """List installed plugins (built-in and from the `vlkit` entry-point group) and what they register."""
        from ..plugins import get_plugins
        from .output import console, print_json, table

        infos = get_plugins().plugin_infos()
        if json_out:
            print_json([{"name": i.name, "version": i.version, "builtin": i.builtin, "registers": i.registers}
                        for i in infos])
            return
        rows = []
        for i in infos:
            what = "; ".join(f"{k}: {', '.join(sorted(v))}" for k, v in sorted(i.registers.items())) or "commands"
            rows.append([i.name, i.version, "built-in" if i.builtin else "external", what])
        console.print(table("vlkit plugins", ["plugin", "version", "source", "registers"], rows))
