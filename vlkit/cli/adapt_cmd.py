"""`vlkit adapt`: few-shot domain adaptation with in-domain and general-domain (retention) scores."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import typer

from .adapt_generative import fmt, row_note, run_row, single_run


def _cross_columns(res) -> tuple[list[str], list[str]]:
    """(target labels, their column headers "→ label") of a result with cross-domain targets."""
    cross = res.get("cross_domain") or {}
    labels = list(cross.get("targets") or [])
    frozen = cross.get("frozen") or {}
    return labels, [f"→ {t} (frozen {fmt(frozen.get(t))})" if "summary" in res else f"→ {t}" for t in labels]


def _single_table(res):
    """The single adapt run's table: a row per model, in-domain, general (retention) and cross-domain columns."""
    from .output import table

    targets, headers = _cross_columns(res)
    rows = []
    for r in res["rows"]:
        note = row_note(r)
        if "gate" in r:
            note = f"gate: {r['gate']['in_domain_routed_percent']:.0f}% of test images adapted; in {r['gate']['dir']}/"
        rows.append(run_row(r, note, more=tuple(fmt((r.get("cross") or {}).get(t)) for t in targets)))
    columns = ["method", "trainable", res["domain"], f"{res['general_domain']} (general)", "Δ general"]
    return table(
        f"{res['domain']} adaptation, {res['shots']} shots/class — accuracy %",
        [*columns, "retention %", *headers, "note"],
        rows,
    )


def _protocol(
    backbone, domain, shots, out, methods, seeds, data, steps, options, json_out, overwrite, extra: dict
) -> None:
    from ..train.adapt import METHOD_LABELS
    from ..train.fewshot import parse_ints, run_fewshot
    from .output import console, print_json, table

    seed_list = parse_ints(seeds or "1,2,3", "--seeds")
    names = [m.strip() for m in methods.split(",") if m.strip()]
    with console.status("few-shot protocol…") as status:

        def on_run(r):
            status.update(f"{r['method']} {r['shots']} shots seed {r['seed']}: {r['accuracy']:.1f}%")

        res = run_fewshot(
            backbone,
            names,
            shots,
            seed_list,
            data=data,
            domain=domain,
            out=out,
            steps=steps,
            adapter_options=options,
            progress=None,
            overwrite=overwrite,
            on_run=on_run,
            **extra,
        )
    b2n = res["protocol"] == "base2novel"
    general = "general" in res
    gated = any("gated_accuracy" in r for r in res["summary"])
    targets, headers = _cross_columns(res)
    top = (res.get("cross_domain") or {}).get("shots")
    columns = [
        "method",
        "shots",
        "base" if b2n else "accuracy",
        *(["novel", "HM"] if b2n else []),
        *([f"general ({res['general']['data']})", "retention %"] if general else []),
        *(["gated", "gated retention %"] if gated else []),
        *headers,
        "seeds",
        "trainable",
        "train s",
    ]
    rows = []
    for r in res["summary"]:
        rows.append(
            [
                METHOD_LABELS.get(r["method"], r["method"]),
                r["shots"],
                f"{r['mean']:.1f} ± {r['sd']:.1f}",
                *([fmt(r.get("novel")), fmt(r.get("hm"))] if b2n else []),
                *([fmt(r.get("general")), fmt(r.get("retention"))] if general else []),
                *([fmt(r.get("gated_accuracy")), fmt(r.get("gated_retention"))] if gated else []),
                *(fmt((r.get("cross") or {}).get(t)) if r["shots"] == top else "—" for t in targets),
                r["seeds"],
                f"{r['trainable']:,}",
                f"{r['seconds']:.1f}",
            ]
        )
    console.print(
        table(
            f"{'base-to-novel' if b2n else 'few-shot'} {res['data']} ({backbone}) — accuracy %, "
            f"mean ± sd over seeds {res['seeds']}" + (f"; → other domains at {top} shots" if targets else ""),
            columns,
            rows,
        )
    )
    if gated:
        console.print("gated: the adapter behind a domain gate calibrated on its training set (vlkit.compose.gate)")
    console.print(f"table and plot written to {out}/fewshot.json, {out}/fewshot.png")
    if json_out:
        print_json(res)


def register(cli: typer.Typer) -> None:
    @cli.command("adapt")
    def adapt_cmd(
        backbone: str = typer.Option("tiny", "--backbone", "-b", help="Backbone spec."),
        domain: str = typer.Option("medical", "--domain", help="Target domain of the embedded world."),
        task: str | None = typer.Option(
            None,
            "--task",
            "-t",
            help="Task to adapt for: on a generative backbone any generative task (default captioning; "
            "vqa-gen, gqa, nlvr2, a plugin's); on a dual encoder classification.",
        ),
        shots: str = typer.Option(
            "16",
            "--shots",
            help="Training examples per class (generative tasks: training examples in total); a list "
            "(1,2,4,8,16) runs the few-shot protocol.",
        ),
        method: str | None = typer.Option(
            None,
            "--method",
            "-m",
            help="Few-shot protocol: method(s), comma-separated: an adapter "
            "variant, tip-adapter, zeroshot, linear (L-BFGS), linear-sgd or full (generative backbones: "
            "a variant, zeroshot or full).",
        ),
        seeds: str | None = typer.Option(None, "--seeds", help="Few-shot protocol: seeds (e.g. 1,2,3)."),
        data: str | None = typer.Option(
            None,
            "--data",
            help="Few-shot protocol: a data spec with train and "
            "test splits (e.g. coop:DATA/eurosat); default "
            "the embedded world's --domain.",
        ),
        out: Path = typer.Option(Path("runs/adapt"), "--out", "-o", help="Adapter directory."),
        variant: str = typer.Option("bottleneck", "--adapter", "-a", help="Adapter variant."),
        baselines: str | None = typer.Option(None, "--baselines", help="Also run: full, linear (L-BFGS), linear-sgd."),
        steps: int | None = typer.Option(
            None, "--steps", help="Training steps (default: 6 x shots, >= 60; generative: 2 x shots, >= 60)."
        ),
        lr: float | None = typer.Option(
            None, "--lr", help="Learning rate (default per method: adapters 2e-3, linear-sgd 1e-2, full 1e-4)."
        ),
        batch_size: int | None = typer.Option(
            None, "--batch-size", help="Batch size (default: min(32, 4 x shots); generative: min(16, shots))."
        ),
        prompt: str | None = typer.Option(None, "--prompt", help="Class prompt template with one {}."),
        templates: str | None = typer.Option(
            None, "--templates", help="Prompt ensemble: imagenet (CLIP's 80), photo, or a file of templates."
        ),
        protocol: str | None = typer.Option(
            None, "--protocol", help="fewshot (default) or base2novel (CoCoOp: train on the base half of the classes)."
        ),
        general: str | None = typer.Option(
            None,
            "--general",
            help="Few-shot protocol: general-domain data spec "
            "for retention (default: the world's photo "
            "domain without --data).",
        ),
        eval_domains: str | None = typer.Option(
            None,
            "--eval-domains",
            help="Cross-domain: also score on these world domains (comma-separated, or all), "
            "the frozen backbone's zero-shot score beside; with --method at the largest --shots.",
        ),
        eval_data: str | None = typer.Option(
            None,
            "--eval-data",
            help="Cross-domain with --data: other datasets' test sets to score on (data specs, comma-separated).",
        ),
        gate: bool | None = typer.Option(
            None,
            "--gate/--no-gate",
            help="Also put the adapter behind a domain gate fitted to its training images (default on): inputs "
            "unlike them run through the frozen backbone; writes OUT/gated/ and the gated row (in-domain and "
            "retention).",
        ),
        seed: int = typer.Option(0, "--seed"),
        option: list[str] | None = typer.Option(None, "--option", "-O", help="Adapter option key=value."),
        json_out: bool = typer.Option(False, "--json", help="Print the result as JSON on stdout."),
        overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty output directory."),
    ) -> None:
        """Train a domain adapter on k shots per class and print in-domain and retention scores; with --method,
        --seeds, --data or several --shots, run the few-shot protocol and print its table (mean ± sd) and plot."""
        from ..train.adapt import run_adapt
        from ..train.fewshot import parse_ints
        from .common import parse_kv
        from .output import print_json

        shot_list = parse_ints(shots, "--shots")
        from ..backbones.loading import load_backbone
        from ..train.adapt_generative import GENERATIVE, check_dual_encoder_task

        loaded = load_backbone(backbone)
        if loaded.kind == GENERATIVE:  # VL-Adapter's setting: vlkit.train.adapt_generative
            from .adapt_generative import DUAL_ENCODER_ONLY, adapt_generative, check_options

            check_options(dict(zip(DUAL_ENCODER_ONLY, (prompt, templates, protocol, eval_domains, eval_data, gate))))
            adapt_generative(
                loaded,
                backbone=backbone,
                task=task,
                domain=domain,
                shots=shot_list,
                out=out,
                method=method,
                seeds=seeds,
                data=data,
                general=general,
                variant=variant,
                baselines=baselines,
                steps=steps,
                lr=lr,
                batch_size=batch_size,
                seed=seed,
                adapter_options=parse_kv(option),
                json_out=json_out,
                overwrite=overwrite,
            )
            return
        check_dual_encoder_task(loaded, task)
        del loaded
        task_options = {k: v for k, v in (("prompt", prompt), ("templates", templates)) if v is not None}
        if method or seeds or data or protocol or general or eval_data or len(shot_list) > 1:
            _protocol(
                backbone,
                domain,
                shot_list,
                out,
                method or variant,
                seeds,
                data,
                steps,
                parse_kv(option),
                json_out,
                overwrite,
                {
                    "lr": lr,
                    "batch_size": batch_size,
                    "task_options": task_options,
                    "protocol": protocol or "fewshot",
                    "general": general,
                    "eval_domains": eval_domains,
                    "eval_data": eval_data,
                    "gate": gate is not False,
                },
            )
            return
        n_shots = shot_list[0]

        base = tuple(b.strip() for b in (baselines or "").split(",") if b.strip())
        res = single_run(
            partial(
                run_adapt,
                backbone,
                domain,
                n_shots,
                out,
                variant,
                base,
                steps,
                seed,
                adapter_options=parse_kv(option),
                overwrite=overwrite,
                lr=lr,
                batch_size=batch_size,
                task_options=task_options,
                eval_domains=eval_domains,
                gate=gate is not False,
            ),
            _single_table,
        )
        if json_out:
            print_json(res)
