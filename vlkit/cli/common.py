"""Helpers shared by command modules: parsing key=value options and rendering the parameter report."""

from __future__ import annotations

from typing import Any

from ..errors import ConfigError


def parse_kv(items: list[str] | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"option {item!r} is not of the form key=value")
        out[key.strip()] = value.strip()
    return out


def report_table(report: dict[str, Any]):
    from .output import table

    rows = [["all", f"{report['total']:,}", f"{report['trainable']:,}", f"{report['trainable_percent']:.3f}%"]]
    for tower, t in report["towers"].items():
        pct = 100.0 * t["trainable"] / max(t["total"], 1)
        rows.append([f"tower: {tower}", f"{t['total']:,}", f"{t['trainable']:,}", f"{pct:.3f}%"])
    for name, a in report["adapters"].items():
        rows.append(
            [
                f"adapter: {name} ({a['variant']}, {a['sites']} sites)",
                f"{a['parameters']:,}",
                "",
                f"{a['percent_of_backbone']:.3f}% of backbone",
            ]
        )
    return table(f"parameters — {report['backbone']}", ["scope", "total", "trainable", "trainable %"], rows)
