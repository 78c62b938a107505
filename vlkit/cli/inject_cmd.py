"""`vlkit inject`: put an adapter into a backbone and write the initialised adapter directory."""
from __future__ import annotations

from pathlib import Path

import typer


def register(cli: typer.Typer) -> None:
    @cli.command("inject")
    def inject_cmd(
        backbone: str = typer.Option("tiny", "--backbone", "-b", help="Backbone spec: tiny, open_clip:M@tag, hf:dir."),
        adapter: str = typer.Option("bottleneck", "--adapter", "-a", help="Adapter variant (see `vlkit plugins`)."),
        out: Path | None = typer.Option(None, "--out", "-o", help="Directory for the adapter."),
        name: str = typer.Option("default", "--name", help="Adapter name stored in the config."),
        towers: str | None = typer.Option(None, "--towers", help="vision, text or both."),
        layers: str | None = typer.Option(None, "--layers", help="Layer indices, e.g. 0,1,-1."),
        targets: str | None = typer.Option(None, "--targets", help="Roles or module paths (re:REGEX allowed)."),
        exclude: str | None = typer.Option(None, "--exclude", help="Roles or module paths to skip."),
        reduction: float | None = typer.Option(None, "--reduction", help="Bottleneck reduction factor."),
        hidden: int | None = typer.Option(None, "--hidden", help="Bottleneck hidden size."),
        placement: str | None = typer.Option(None, "--placement", help="Bottleneck placement: attn, mlp, both."),
        rank: int | None = typer.Option(None, "--rank", help="LoRA rank."),
        alpha: float | None = typer.Option(None, "--alpha", help="LoRA alpha."),
        option: list[str] | None = typer.Option(None, "--option", "-O", help="Any variant option as key=value."),
        dry_run: bool = typer.Option(False, "--dry-run", help="List targeted modules; write nothing."),
        json_out: bool = typer.Option(False, "--json", help="Print the result as JSON on stdout."),
        overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty output directory."),
    ) -> None:
        """Inject an adapter into a frozen backbone, print the parameter table, write the adapter directory."""
        from ..errors import ConfigError
        from .common import parse_kv, report_table
        from .output import console, print_json, table

        if out is None and not dry_run:
            raise ConfigError("give an output directory with -o/--out (or use --dry-run)")
        options = {k: v for k, v in dict(towers=towers, layers=layers, targets=targets, exclude=exclude,
                                         reduction=reduction, hidden=hidden, placement=placement,
                                         rank=rank, alpha=alpha).items() if v is not None}
        options.update(parse_kv(option))

        from ..backbones.loading import factory_name
        from ..plugins import registry

        # cheap checks first: a bad name or option fails before a large backbone loads
        registry("backbone").get(factory_name(backbone))
        registry("adapter").get(adapter).make_config(**options)
        from ..outputs import OutputTarget

        target = None
        if not dry_run:
            local = [p for p in (backbone.split(":", 1)[-1].split("@")) if p and Path(p).exists()]
            target = OutputTarget(out, overwrite=overwrite, inputs=local, what="adapter directory")
            target.check()

        from .. import load
        from ..plugins import registry

        model = load(backbone)
        record = model.add_adapter(name, adapter, **options)
        report = model.parameter_report()
        result = {"backbone": model.spec, "variant": adapter, "name": name, "config": record.config,
                  "targets": record.targets, "parameters": report, "dry_run": dry_run}
        ref = registry("adapter").get(adapter).plain_equivalent_parameters(record.config_obj, record.sites)
        if ref is not None:
            own = report["adapters"][name]["parameters"]
            result["overhead_vs_bottleneck"] = {"adapter": own, "bottleneck": ref,
                                                "percent": 100.0 * (own - ref) / max(ref, 1)}
        if dry_run:
            console.print(table(f"targets of {adapter} on {model.spec}", ["tower", "layer", "role", "module"],
                                [[s.tower, s.layer, s.role, s.path] for s in record.sites]))
        else:
            with target:
                model.save_adapter(target.staging, name=name)
            result["path"] = str(out)
        console.print(report_table(report))
        if "overhead_vs_bottleneck" in result:
            o = result["overhead_vs_bottleneck"]
            console.print(f"{adapter}: {o['adapter']:,} parameters vs {o['bottleneck']:,} for a plain bottleneck "
                          f"of the same size on the same sites: {o['percent']:+.1f}%")
        if not dry_run:
            console.print(f"wrote adapter [bold]{name}[/] ({adapter}, {len(record.sites)} sites) to {out}")
        if json_out:
            print_json(result)
