"""`vlkit inject`: put an adapter into a backbone and write the initialised adapter directory."""

from __future__ import annotations

from pathlib import Path

import typer

INJECT_SETTINGS = {"allow_extra_args": True, "ignore_unknown_options": True}


def variant_help(variant: str) -> str:
    """The options of adapter variant `variant` as help lines, from its config dataclass."""
    from ..options import option_specs
    from ..plugins import registry

    var = registry("adapter").get(variant)
    lines = [f"Options of adapter variant {variant!r} ({var.summary or type(var).__name__}), as --name VALUE:", ""]
    for s in option_specs(var.config_cls):
        flag = f"--{s.name.replace('_', '-')}"
        default = "" if s.required else f" [default: {s.default!r}]"
        lines.append(f"  {flag} {s.type.upper() if s.type in ('int', 'float', 'str', 'bool') else s.type}")
        lines.append(f"      {s.help or '(no help)'}{default}")
    lines.append("")
    lines.append("Lists (layers, targets, exclude) take comma-separated values; -O key=value also works.")
    return "\n".join(lines)


def register(cli: typer.Typer) -> None:
    @cli.command("inject", context_settings=INJECT_SETTINGS, add_help_option=False)
    def inject_cmd(
        ctx: typer.Context,
        backbone: str = typer.Option("tiny", "--backbone", "-b", help="Backbone spec: tiny, open_clip:M@tag, hf:dir."),
        adapter: str = typer.Option("bottleneck", "--adapter", "-a", help="Adapter variant (see `vlkit plugins`)."),
        out: Path | None = typer.Option(None, "--out", "-o", help="Directory for the adapter."),
        name: str = typer.Option("default", "--name", help="Adapter name stored in the config."),
        option: list[str] | None = typer.Option(None, "--option", "-O", help="Any variant option as key=value."),
        dry_run: bool = typer.Option(False, "--dry-run", help="List targeted modules; write nothing."),
        json_out: bool = typer.Option(False, "--json", help="Print the result as JSON on stdout."),
        overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty output directory."),
        show_help: bool = typer.Option(
            False,
            "--help",
            "-h",
            help="Show this message and exit; with --adapter X, also X's own options (--towers, --rank, ...).",
        ),
    ) -> None:
        """Inject an adapter into a frozen backbone, print the parameter table, write the adapter directory.

        The variant's own options are flags too: `--towers text --rank 4` (see `--adapter X --help`)."""
        from ..errors import ConfigError
        from ..options import option_specs, parse_flag_args
        from ..plugins import registry
        from .common import parse_kv, report_table
        from .output import console, print_json, table

        if show_help:
            typer.echo(ctx.get_help())
            source = ctx.get_parameter_source("adapter")
            if source is not None and source.name not in ("DEFAULT", "DEFAULT_MAP"):
                typer.echo("")
                typer.echo(variant_help(adapter))  # loads the variant (and torch): only when one was named
            raise typer.Exit()
        if out is None and not dry_run:
            raise ConfigError("give an output directory with -o/--out (or use --dry-run)")
        specs = option_specs(registry("adapter").get(adapter).config_cls)
        options = parse_flag_args(list(ctx.args), specs, f"adapter variant {adapter!r}")
        options.update(parse_kv(option))

        from ..backbones.loading import factory_name

        # cheap checks first: a bad name or option fails before a large backbone loads
        registry("backbone").get(factory_name(backbone))
        registry("adapter").get(adapter).make_config(**options)
        from ..outputs import OutputTarget

        target = None
        if out is not None and not dry_run:
            local = [p for p in (backbone.split(":", 1)[-1].split("@")) if p and Path(p).exists()]
            target = OutputTarget(out, overwrite=overwrite, inputs=local, what="adapter directory")
            target.check()

        from .. import load

        model = load(backbone)
        record = model.add_adapter(name, adapter, **options)
        report = model.parameter_report()
        result = {
            "backbone": model.spec,
            "variant": adapter,
            "name": name,
            "config": record.config,
            "targets": record.targets,
            "parameters": report,
            "dry_run": dry_run,
        }
        ref = registry("adapter").get(adapter).plain_equivalent_parameters(record.config_obj, record.sites)
        if ref is not None:
            own = report["adapters"][name]["parameters"]
            result["overhead_vs_bottleneck"] = {
                "adapter": own,
                "bottleneck": ref,
                "percent": 100.0 * (own - ref) / max(ref, 1),
            }
        if dry_run:
            console.print(
                table(
                    f"targets of {adapter} on {model.spec}",
                    ["tower", "layer", "role", "module"],
                    [[s.tower, s.layer, s.role, s.path] for s in record.sites],
                )
            )
        else:
            assert target is not None
            with target:
                model.save_adapter(target.staging, name=name)
            result["path"] = str(out)
        console.print(report_table(report))
        if "overhead_vs_bottleneck" in result:
            o = result["overhead_vs_bottleneck"]
            console.print(
                f"{adapter}: {o['adapter']:,} parameters vs {o['bottleneck']:,} for a plain bottleneck "
                f"of the same size on the same sites: {o['percent']:+.1f}%"
            )
        if not dry_run:
            console.print(f"wrote adapter [bold]{name}[/] ({adapter}, {len(record.sites)} sites) to {out}")
        if json_out:
            print_json(result)
