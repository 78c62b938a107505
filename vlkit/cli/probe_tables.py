"""Probe result tables on stderr (rich): systems x metrics with bootstrap intervals, and one table per breakdown."""

from __future__ import annotations

from typing import Any


def _ci(d: dict[str, float], signed: bool = False) -> str:
    f = "{:+.1f}" if signed else "{:.1f}"
    return f"{f.format(d['value'])} [{f.format(d['low'])}, {f.format(d['high'])}]"


def _diff_cell(d: dict[str, float]) -> str:
    text = _ci(d, signed=True)
    if d["low"] > 0:
        return f"[green]{text}[/]"
    if d["high"] < 0:
        return f"[red]{text}[/]"
    return text


def main_table(result: dict[str, Any]):
    """Systems × metrics with bootstrap intervals, the paired difference to the backbone, chance below."""
    from rich.table import Table

    metrics = result["metrics"]
    level = int(round(100 * result["bootstrap"]["level"]))
    with_diff = len(result["systems"]) > 1
    t = Table(
        title=f"{result['probe']} — {result['dataset']} — {result['backbone']} (n={result['n']}; "
        f"{level}% bootstrap intervals, {result['bootstrap']['resamples']} resamples)"
    )
    t.add_column("system", overflow="fold")
    for m in metrics:
        t.add_column(m, justify="right")
        if with_diff:
            t.add_column(f"Δ {m}", justify="right")
    for s in result["systems"]:
        row = [s["label"]]
        for m in metrics:
            row.append(_ci(s["scores"][m]))
            if with_diff:
                row.append(_diff_cell(s["diff"][m]) if s.get("diff") else "")
        t.add_row(*row)
    if result.get("chance"):
        row = ["[dim]chance[/]"]
        for m in metrics:
            row.append(f"[dim]{result['chance'][m]:.2f}[/]" if m in result["chance"] else "")
            if with_diff:
                row.append("")
        t.add_row(*row)
    return t


TABLE_MAX_TAGS = {"tag": 12}  # a breakdown with more values than this stays in the JSON only


def breakdown_tables(result: dict[str, Any]) -> list:
    """One table per breakdown key: rows (tag, system), the metrics, and for adapters (Δ to the backbone).

    Winoground's fine-grained ``tag`` breakdown is shown when it has at most 12 values (the world's pairs
    have 7; the real dataset has dozens, kept in the JSON result)."""
    from rich.table import Table

    systems = result["systems"]
    keys = list(dict.fromkeys(k for s in systems for k in (s.get("breakdowns") or {})))
    tables = []
    base = systems[0]
    for key in keys:
        tags = list(dict.fromkeys(tag for s in systems for tag in s["breakdowns"].get(key, {})))
        if not tags or len(tags) > TABLE_MAX_TAGS.get(key, len(tags)):
            continue
        first: dict[str, Any] = next(iter(base["breakdowns"].get(key, {}).values()), {})
        metrics = [m for m in result["metrics"] if m in first] or [m for m in first if m != "n"]
        marked = any("diff" in r for s in systems[1:] for r in s["breakdowns"].get(key, {}).values())
        level = int(round(100 * result.get("bootstrap", {}).get("level", 0.95)))
        t = Table(
            title=f"by {key}",
            caption=(f"(Δ to the backbone; * its paired {level}% interval excludes 0)" if marked else None),
        )
        for col in (key, "n", "system"):
            t.add_column(col, justify="right" if col == "n" else "left")
        for m in metrics:
            t.add_column(m, justify="right")
        for tag in tags:
            for j, s in enumerate(systems):
                row = s["breakdowns"].get(key, {}).get(tag)
                if row is None:
                    continue
                ref = base["breakdowns"].get(key, {}).get(tag)
                cells = []
                for m in metrics:
                    cell = f"{row[m]:.1f}"
                    if j and ref is not None:
                        d = (row.get("diff") or {}).get(m)
                        delta = f"{row[m] - ref[m]:+.1f}"
                        if d is not None and (d["low"] > 0 or d["high"] < 0):
                            delta = f"[{'green' if d['low'] > 0 else 'red'}]{delta}*[/]"
                        cell += f" ({delta})"
                    cells.append(cell)
                t.add_row(tag if j == 0 else "", str(row["n"]) if j == 0 else "", s["label"], *cells)
            if len(systems) > 1:
                t.add_section()
        tables.append(t)
    return tables


def print_report(result: dict[str, Any], console) -> None:
    console.print(main_table(result))
    for t in breakdown_tables(result):
        console.print(t)
