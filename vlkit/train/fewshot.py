"""The few-shot protocol (CoOp's; CoCoOp's base-to-novel): every method at every shot count over every seed, each
run by `vlkit.train.fewshot_run`; the summary (accuracy mean ± sd per method and shot count), its table
(fewshot.json) and plot (fewshot.png).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vlkit.backbones.loading import load_backbone

from ..data.kinds import kind_domains
from ..errors import ConfigError
from ..io import write_json
from ..outputs import OutputTarget
from ..plugins import registry
from .adapt import BASE_METHODS, DATA_KIND, GENERAL_DOMAIN, METHOD_LABELS, world_cross
from .baselines import score_on
from .crossdomain import CrossDomain, data_targets
from .evaluate import load_eval_data, round_percent
from .fewshot_run import GATED_KEYS, ProtocolSettings, one_run

PROTOCOLS = ("fewshot", "base2novel")


def check_methods(methods) -> list[str]:
    """The methods of a protocol run: zeroshot, linear (L-BFGS), linear-sgd, full, tip-adapter or any registered
    adapter variant."""

    reg = registry("adapter")
    methods = [m.strip() for m in methods if m and m.strip()]
    if not methods:
        raise ConfigError("--method names no method")
    for m in methods:
        if m not in BASE_METHODS and m not in reg:
            raise ConfigError(
                f"unknown method {m!r}; methods: {', '.join(BASE_METHODS)} or an adapter variant "
                f"({', '.join(reg.names())})"
            )
    return methods


def parse_ints(text, what: str) -> list[int]:
    """'1,2,4' -> [1, 2, 4] (positive integers), a ConfigError naming `what` otherwise."""
    if isinstance(text, int):
        values = [text]
    else:
        try:
            values = [int(v) for v in str(text).split(",") if v.strip()]
        except ValueError:
            raise ConfigError(f"{what} must be comma-separated integers, got {text!r}") from None
    if not values or any(v < 0 for v in values):
        raise ConfigError(f"{what} must be non-negative integers, got {text!r}")
    return values


def _protocol_cross(data, domain: str, eval_domains, eval_data, n_eval: int, seed: int, shots) -> CrossDomain:
    """The protocol's cross-domain targets, scored at the largest shot count: world domains (`eval_domains`,
    without `data`) or other datasets' test sets (`eval_data`, with it)."""
    if data is None and eval_data:
        raise ConfigError("--eval-data takes test sets for a --data run; for the embedded world use --eval-domains")
    if data is not None and eval_domains:
        raise ConfigError("--eval-domains names domains of the embedded world; with --data give --eval-data SPEC,...")
    top = max(shots, default=None)
    if data is None:
        return world_cross(eval_domains, domain, n_eval, seed, top, split="test")  # as the general domain's
    return data_targets(eval_data, source=data, task="classification", shots=top)


def _general_spec(s: ProtocolSettings, seed: int):
    """The general domain's data: `general` as given, else for the world its photo domain, else none."""
    if s.general is not None:
        return s.general
    if s.data is None:
        return {
            "kind": DATA_KIND,
            "domain": GENERAL_DOMAIN,
            "task": "classification",
            "n": s.n_eval,
            "seed": seed + 20_000,
        }
    return None


def run_fewshot(
    backbone: str = "tiny",
    methods=("bottleneck",),
    shots=(1, 2, 4, 8, 16),
    seeds=(1, 2, 3),
    *,
    data: str | None = None,
    domain: str = "medical",
    out: str | Path | None = None,
    steps: int | None = None,
    n_eval: int = 400,
    adapter_options: dict | None = None,
    lr: float | None = None,
    batch_size: int | None = None,
    task_options: dict | None = None,
    protocol: str = "fewshot",
    general: Any = None,
    progress=None,
    overwrite: bool = False,
    plot: bool = True,
    on_run=None,
    eval_domains: str | list[str] | None = None,
    eval_data: str | list[str] | None = None,
    gate: bool = True,
) -> dict[str, Any]:
    """CoOp's few-shot protocol: every method at every shot count over every seed; accuracy mean ± sd per
    (method, shots), trainable parameters and training seconds per run. `data` is a data spec with train and
    test splits (e.g. `coop:DATA/eurosat`); default the embedded world's `domain`. With `out`, each run's
    files go under `out/<method>/<shots>shot-seed<seed>/` and the table (fewshot.json) and plot (fewshot.png)
    beside them (written whole, `vlkit.outputs`).

    `protocol="base2novel"` is CoCoOp's: trained on the first half of the classes, scored on the base and the
    novel classes of the test set and their harmonic mean. `general` (a data spec; default the world's photo
    domain when `data` is None) adds each run's general-domain score and its retention, as a percentage of
    the frozen backbone's. `task_options` (prompt or templates) reach every run's classification task.

    Cross-domain (`vlkit.train.crossdomain`): `eval_domains` (world domains, `all`: every other one; without
    `data`) or `eval_data` (data specs of other test sets; with `data`) adds each run's accuracy there at the
    largest shot count (`cross` in its row, the summary and metrics.json), with the frozen backbone's zero-shot
    accuracy on each (the result's `cross_domain`).

    `gate` (default): each trained adapter run is also scored behind a domain gate calibrated on its training set
    (`vlkit.train.retention`): `gated_accuracy`, `gated_general`, `gated_retention` and `gated_routed` (percent of
    the in-domain test images the gate sends to the adapter) in its row and the summary."""

    methods = check_methods(methods)
    if protocol not in PROTOCOLS:
        raise ConfigError(f"--protocol must be one of {', '.join(PROTOCOLS)}, got {protocol!r}")
    if batch_size is not None and batch_size < 1:
        raise ConfigError(f"--batch-size must be at least 1, got {batch_size}")
    if lr is not None and not lr > 0:
        raise ConfigError(f"--lr must be a positive number, got {lr}")
    shots, seeds = list(shots), list(seeds)
    if data is None:
        domains = kind_domains(DATA_KIND) or ()
        if domain not in domains:
            raise ConfigError(f"unknown domain {domain!r}; known: {', '.join(domains)}")
    s = ProtocolSettings(
        backbone,
        data,
        domain,
        n_eval,
        steps,
        lr,
        batch_size,
        adapter_options,
        dict(task_options or {}),
        protocol,
        general,
        progress,
        _protocol_cross(data, domain, eval_domains, eval_data, n_eval, seeds[0] if seeds else 0, shots),
        gate,
    )
    if out is None:
        import tempfile

        with tempfile.TemporaryDirectory(prefix="vlkit-fewshot-") as tmp:
            return _run_fewshot(s, methods, shots, seeds, Path(tmp), Path(tmp), False, on_run)
    with OutputTarget(out, overwrite=overwrite, what="adapt output directory") as target:
        result = _run_fewshot(s, methods, shots, seeds, target.staging, Path(out), plot, on_run)
    result["out"] = str(out)
    return result


def summarize(
    runs: list[dict[str, Any]], methods, shots, metric: str = "accuracy", keys: tuple[str, ...] | None = None
) -> list[dict[str, Any]]:
    """Per (method, shots): mean ± sd of `metric` over the seeds, the mean of each of `keys` the runs have (None
    where they have it unset), and the mean cross-domain scores. `keys` defaults to the CLIP protocol's."""
    import statistics

    if keys is None:
        keys = ("base", "novel", "hm", "general", "retention", *GATED_KEYS)

    def mean(rs, key):
        vals = [r[key] for r in rs if r.get(key) is not None]
        return statistics.fmean(vals) if vals else None

    out: list[dict[str, Any]] = []
    for method in methods:
        for k in shots:
            rs = [r for r in runs if r["method"] == method and r["shots"] == k]
            values = [r[metric] for r in rs]
            row = {
                "method": method,
                "shots": k,
                "mean": statistics.fmean(values),
                "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
                "seeds": len(values),
                "trainable": rs[0]["trainable"],
                "seconds": statistics.fmean(r["seconds"] for r in rs),
            }
            for key in keys:
                if any(key in r for r in rs):
                    row[key] = mean(rs, key)
            crosses = [r["cross"] for r in rs if "cross" in r]
            if crosses:
                row["cross"] = {d: statistics.fmean(c[d] for c in crosses) for d in crosses[0]}
            out.append(row)
    return out


def _run_fewshot(s: ProtocolSettings, methods, shots, seeds, out: Path, final: Path, plot, on_run) -> dict[str, Any]:
    runs: list[dict[str, Any]] = []
    general = None
    spec = _general_spec(s, seeds[0])
    if spec is not None:
        gen_ds, _ = load_eval_data(spec, "classification")
        general = (gen_ds, score_on(load_backbone(s.backbone), "classification", gen_ds, s.task_options))
    if s.cross is not None and s.cross.targets:
        s.cross.measure_frozen(load_backbone(s.backbone), s.task_options)
    for method in methods:
        for k in shots:
            for seed in seeds:
                rel = Path(method) / f"{k}shot-seed{seed}"
                row = one_run(s, method, k, seed, out / rel, final / rel, general)
                runs.append(row)
                if on_run is not None:
                    on_run(row)
    summary = summarize(runs, methods, shots)
    result = {
        "backbone": s.backbone,
        "data": s.data or f"{DATA_KIND}:{s.domain}",
        "protocol": s.protocol,
        "methods": methods,
        "shots": shots,
        "seeds": seeds,
        "metric": "accuracy",
        "task_options": s.task_options,
        "summary": summary,
        "runs": runs,
        **(s.cross.result_entry() if s.cross is not None else {}),
    }
    if general is not None:
        result["general"] = {
            "data": s.general if s.general is not None else f"{DATA_KIND}:{GENERAL_DOMAIN}",
            "frozen": general[1],
        }
    result = round_percent(result)
    write_json(out / "fewshot.json", result)
    if plot:
        plot_fewshot(
            summary, out / "fewshot.png", title=f"{result['data']} ({s.backbone}), mean ± sd over {len(seeds)} seed(s)"
        )
        result["plot"] = str(final / "fewshot.png")
    return result


def plot_fewshot(summary: list[dict[str, Any]], path: str | Path, title: str = "") -> Path:
    """Accuracy against shots per class (log2 axis), one line per method with its ± sd band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    methods = list(dict.fromkeys(r["method"] for r in summary))
    cmap: Any = plt.get_cmap("tab10" if len(methods) <= 10 else "tab20")  # a ListedColormap: it has .colors
    colors = cmap.colors
    for i, method in enumerate(methods):
        rs = sorted((r for r in summary if r["method"] == method), key=lambda r: r["shots"])
        xs = [r["shots"] for r in rs]
        ys = [r["mean"] for r in rs]
        sd = [r["sd"] for r in rs]
        (line,) = ax.plot(
            xs,
            ys,
            marker="os^D"[i % 4],
            color=colors[i % len(colors)],
            linestyle="-" if i % 2 == 0 else "--",
            label=METHOD_LABELS.get(method, method),
        )
        ax.fill_between(
            xs, [y - s for y, s in zip(ys, sd)], [y + s for y, s in zip(ys, sd)], alpha=0.15, color=line.get_color()
        )
    if len({r["shots"] for r in summary}) > 1:
        ax.set_xscale("log", base=2)
    ax.set_xticks(sorted({r["shots"] for r in summary}))
    ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.set_xlabel("shots per class")
    ax.set_ylabel("accuracy %")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)
