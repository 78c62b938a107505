"""`vlkit adapt` on a generative backbone (`vlkit.train.adapt_generative`): the options it reads, the run or the
few-shot protocol, and their tables (the task's metric in-domain, on the general domain, and retention)."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from ..errors import ConfigError

DUAL_ENCODER_ONLY = ("--prompt", "--templates", "--protocol", "--eval-domains", "--eval-data", "--gate")


def fmt(v) -> str:
    """A score to one decimal, "—" where there is none (the adapt tables, both kinds of backbone)."""
    return "—" if v is None else f"{v:.1f}"


def row_note(r: dict[str, Any]) -> str:
    """The note of a single adapt run's row: the frozen model's check that it is unchanged, a baseline's
    forgetting (the latter wins)."""
    note = ""
    if "verified_unchanged" in r:
        note = "identical to frozen ✓" if r["verified_unchanged"] else "DIFFERS from frozen ✗"
    if "forgetting" in r:
        note = f"forgetting {r['forgetting']:.1f}"
    return note


def run_row(r: dict[str, Any], note: str, in_domain: tuple = (), more: tuple = ()) -> list[Any]:
    """A single adapt run's table row: method, trainable share, the in-domain score (then `in_domain`), the general
    score, its change and retention (then `more`), and `note`."""
    return [
        r["method"],
        f"{r['trainable_percent']:.2f}%",
        fmt(r["in_domain"]),
        *in_domain,
        fmt(r["general"]),
        f"{r['general_change']:+.1f}",
        fmt(r.get("retention")),
        *more,
        note,
    ]


def single_run(run: Callable[..., dict[str, Any]], run_table: Callable[[dict[str, Any]], Any]) -> dict[str, Any]:
    """One adapt run, `run(progress=bar)` under a training bar, then its table `run_table(result)` and where the
    adapter went; returns the result."""
    from .output import console
    from .progress import TrainProgress

    bar = TrainProgress()
    try:
        res = run(progress=bar)
    finally:
        bar.close()
    console.print(run_table(res))
    console.print(f"adapter written to {res['adapter_dir']}")
    return res


def check_options(given: dict[str, Any]) -> None:
    """The adapt options that only a dual encoder's classification reads are refused, in one line."""
    used = [name for name in DUAL_ENCODER_ONLY if given.get(name) is not None]
    if used:
        raise ConfigError(
            f"{', '.join(used)}: options of a dual encoder's classification; on a generative backbone give "
            "--task (`vlkit plugins` lists the tasks), --shots, --method, --data, --general"
        )


def single_table(res: dict[str, Any]):
    """The single run's table: a row per model, the task's metrics in-domain, the general score and retention."""
    from .output import table

    metric = res["metric"]
    others = [m for m in res["metrics"] if m != metric]
    rows = []
    for r in res["rows"]:
        inside = r.get("in_domain_metrics") or {}
        rows.append(run_row(r, row_note(r), in_domain=tuple(fmt(inside.get(m)) for m in others)))
    domain, general = res["domain"], res["general_domain"]
    columns = [
        "method",
        "trainable",
        f"{domain} {metric}",
        *(f"{domain} {m}" for m in others),
        f"{general} (general) {metric}",
        "Δ general",
        "retention %",
        "note",
    ]
    return table(
        f"{domain} {res['task']} adaptation of {res['backbone']}, {res['shots']} training examples "
        f"({res['n_eval']} held out)",
        columns,
        rows,
    )


def protocol_table(res: dict[str, Any]):
    """The protocol's table: mean ± sd of the metric per (method, shots), the general score and retention."""
    from .output import table

    general = "general" in res
    rows = [
        [
            r["method"],
            r["shots"],
            f"{r['mean']:.1f} ± {r['sd']:.1f}",
            *([fmt(r.get("general")), fmt(r.get("retention"))] if general else []),
            r["seeds"],
            f"{r['trainable']:,}",
            f"{r['seconds']:.1f}",
        ]
        for r in res["summary"]
    ]
    columns = [
        "method",
        "shots",
        res["metric"],
        *([f"general ({res['general']['data']}) {res['metric']}", "retention %"] if general else []),
        "seeds",
        "trainable",
        "train s",
    ]
    return table(
        f"few-shot {res['data']} {res['task']} ({res['backbone']}) — {res['metric']}, mean ± sd over seeds "
        f"{res['seeds']}; shots = training examples",
        columns,
        rows,
    )


def adapt_generative(
    frozen,
    *,
    backbone: str,
    task: str | None,
    domain: str,
    shots: list[int],
    out: Path,
    method: str | None,
    seeds: str | None,
    data: str | None,
    general: str | None,
    variant: str,
    baselines: str | None,
    steps: int | None,
    lr: float | None,
    batch_size: int | None,
    seed: int,
    adapter_options: dict[str, Any],
    json_out: bool,
    overwrite: bool,
) -> None:
    """`vlkit adapt` on the generative backbone `frozen` (loaded from `backbone`): one run, or with --method,
    --seeds, --data, --general or several --shots the few-shot protocol."""
    from ..train.adapt_generative import run_adapt_generative, run_fewshot_generative
    from ..train.fewshot import parse_ints
    from .output import console, print_json

    common: dict[str, Any] = {
        "task": task,
        "domain": domain,
        "steps": steps,
        "lr": lr,
        "batch_size": batch_size,
        "adapter_options": adapter_options,
        "frozen": frozen,
    }
    if method or seeds or data or general or len(shots) > 1:
        with console.status("few-shot protocol…") as status:

            def on_run(r):
                status.update(f"{r['method']} {r['shots']} examples seed {r['seed']}: {r['score']:.1f}")

            res = run_fewshot_generative(
                backbone,
                [m.strip() for m in (method or variant).split(",") if m.strip()],
                shots,
                parse_ints(seeds or "1,2,3", "--seeds"),
                data=data,
                general=general,
                out=out,
                overwrite=overwrite,
                on_run=on_run,
                **common,
            )
        console.print(protocol_table(res))
        console.print(f"table written to {out}/fewshot.json")
    else:
        res = single_run(
            partial(
                run_adapt_generative,
                backbone,
                shots=shots[0],
                out=out,
                variant=variant,
                baselines=tuple(b.strip() for b in (baselines or "").split(",") if b.strip()),
                seed=seed,
                overwrite=overwrite,
                **common,
            ),
            single_table,
        )
    if json_out:
        print_json(res)
