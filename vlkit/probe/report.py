"""Presenting a probe result: the result file (never overwriting another run's), the per-example score file
and the grouped bar chart (the tables are drawn by `vlkit.cli.probe_tables`). Works for any probe that returns
the common result dict.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..io import atomic_path, write_json, write_text
from .base import public_result

MAX_SLUG = 60


def slug(text: str, limit: int = MAX_SLUG) -> str:
    """A file-name-safe form of `text` (letters, digits, '.', '_', '+', '-')."""
    out = re.sub(r"[^A-Za-z0-9_.+-]+", "-", str(text)).strip("-.")
    return (out[:limit].rstrip("-.") if len(out) > limit else out) or "x"


def backbone_slug(spec: str) -> str:
    """``tiny@random`` -> ``tiny-random``; ``hf:/models/clip-b32`` -> ``hf-clip-b32`` (paths by their last part)."""
    kind, sep, rest = spec.partition(":") if ":" in spec.split("@", 1)[0] else ("", "", spec)
    pieces = [kind] if sep else []
    for part in rest.split("@", 1):
        name = Path(part.rstrip("/\\")).name if ("/" in part or "\\" in part) else part
        pieces.append(Path(name).stem if name.endswith((".json", ".safetensors", ".bin", ".pt")) else name)
    return slug("-".join(p for p in pieces if p))


def result_stem(result: dict[str, Any]) -> str:
    """``DATASET__BACKBONE__ADAPTERS`` (adapters: 'backbone' when only the frozen backbone was probed)."""
    backbone = backbone_slug(str(result.get("backbone", "backbone")))
    parts = []
    for s in result.get("systems", [])[1:]:
        names = ["-".join(Path(p.strip().rstrip("/\\")).parts[-2:]) for p in str(s["label"]).split("+")]
        parts.append("+".join(slug(n, 40) for n in names))
    adapters = "_".join(parts) if parts else "backbone"
    return "__".join([slug(str(result.get("dataset", result.get("probe", "probe")))), backbone, slug(adapters, 100)])


def write_result_file(result: dict[str, Any], out_dir: str | Path, overwrite: bool = False) -> Path:
    """Write the result as JSON in `out_dir`, named after dataset, backbone and adapters.

    When that name is taken (by another run) and `overwrite` is false, the next free name ``STEM-2.json``,
    ``STEM-3.json``, ... is used; the name is reserved atomically, so two runs never write the same file.
    """
    out = Path(out_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise ConfigError(f"-o/--out must be a directory: {out} is a file")
    out.mkdir(parents=True, exist_ok=True)
    stem = result_stem(result)
    payload = public_result(result)
    if overwrite:
        path = out / f"{stem}.json"
        write_json(path, payload)
        return path
    for k in range(1, 10_000):
        path = out / (f"{stem}.json" if k == 1 else f"{stem}-{k}.json")
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            continue
        os.close(fd)
        try:
            write_json(path, payload)
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        return path
    raise ConfigError(f"too many result files named {stem}-*.json in {out}")  # pragma: no cover


def score_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Per-example rows ``{"id", "system", [extra columns], key: score, ...}`` (Winoground keys: c0_i0, c0_i1,
    c1_i0, c1_i1 — the official per-example score dict, one row per example and system)."""
    per = result.get("per_example")
    if not per:
        raise ConfigError(f"probe {result.get('probe')!r} returned no per-example scores")
    keys, ids, extra = per["keys"], per["ids"], per.get("extra", {})
    rows = []
    for system in result["systems"]:
        for i, values in enumerate(per["scores"][system["label"]]):
            row: dict[str, Any] = {"id": ids[i], "system": system["label"]}
            row.update({col: vals[i] for col, vals in extra.items()})
            row.update({k: float(v) for k, v in zip(keys, values)})
            rows.append(row)
    return rows


def write_scores_file(result: dict[str, Any], path: str | Path) -> Path:
    """The per-example scores as JSONL (see `score_rows`)."""
    path = Path(path).expanduser()
    write_text(path, "".join(json.dumps(r) + "\n" for r in score_rows(result)))
    return path


# ----------------------------------------------------------------------------------------- tables

# ----------------------------------------------------------------------------------------- plot


def plot_result(result: dict[str, Any], path: str | Path) -> Path:
    """Grouped bar chart: one group per metric, one bar per system with its interval, chance as dashed lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    path = Path(path).expanduser()
    if path.suffix.lower() not in (".png", ".svg", ".pdf"):
        raise ConfigError(f"--plot needs a .png, .svg or .pdf file name, got {path.name}")
    metrics, systems = result["metrics"], result["systems"]
    width = 0.8 / max(len(systems), 1)
    x = np.arange(len(metrics))
    fig, ax = plt.subplots(figsize=(max(5.0, 1.6 * len(metrics) * max(1, len(systems)) ** 0.5), 4.0))
    try:
        for j, s in enumerate(systems):
            vals = np.array([s["scores"][m]["value"] for m in metrics])
            err = np.array(
                [
                    [s["scores"][m]["value"] - s["scores"][m]["low"] for m in metrics],
                    [s["scores"][m]["high"] - s["scores"][m]["value"] for m in metrics],
                ]
            )
            ax.bar(x - 0.4 + width * (j + 0.5), vals, width, yerr=err, capsize=3, label=s["label"])
        chance = result.get("chance") or {}
        for i, m in enumerate(metrics):
            if m in chance:
                ax.hlines(
                    chance[m],
                    i - 0.45,
                    i + 0.45,
                    colors="black",
                    linestyles="dashed",
                    linewidth=1,
                    label="chance" if i == 0 else "_nolegend_",
                )
        ax.set_xticks(x, metrics)
        ax.set_ylabel("score (%)")
        ax.set_ylim(0, 100)
        ax.set_title(f"{result['probe']} — {result['dataset']} — {result['backbone']} (n={result['n']})", fontsize=9)
        ax.legend(fontsize=8)
        fig.tight_layout()
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format=path.suffix.lower().lstrip("."), dpi=120)
    finally:
        plt.close(fig)
    return path
