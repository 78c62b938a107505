"""`vlkit plugins`: every plugin, its version and what it registers; `--json` adds, per registered object that
declares them, its options (name, type, default, help, required: `vlkit.options.OptionSpec`)."""

from __future__ import annotations

import typer


def register(cli: typer.Typer) -> None:
    @cli.command("plugins")
    def plugins(json_out: bool = typer.Option(False, "--json", help="Print JSON on stdout.")) -> None:
        """List installed plugins (built-in and from the `vlkit` entry-point group) and what they register."""
        from ..options import option_specs
        from ..plugins import get_plugins, options_class
        from .output import console, print_json, table

        system = get_plugins()
        infos = system.plugin_infos()
        if json_out:
            options: dict[str, dict[str, dict[str, list]]] = {}
            for kind, reg in system.registries.items():
                for entry in reg:
                    cls = options_class(entry)
                    if cls is not None:
                        options.setdefault(entry.plugin, {}).setdefault(kind, {})[entry.name] = [
                            s.to_dict() for s in option_specs(cls)
                        ]
            print_json(
                [
                    {
                        "name": i.name,
                        "version": i.version,
                        "builtin": i.builtin,
                        "registers": i.registers,
                        "options": options.get(i.name, {}),
                    }
                    for i in infos
                ]
            )
            return
        rows = []
        for i in infos:
            what = "; ".join(f"{k}: {', '.join(sorted(v))}" for k, v in sorted(i.registers.items())) or "commands"
            rows.append([i.name, i.version, "built-in" if i.builtin else "external", what])
        console.print(table("vlkit plugins", ["plugin", "version", "source", "registers"], rows))
