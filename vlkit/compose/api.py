"""`compose(sources, mode, out)`: the one entry behind `vlkit compose`, writing a composition directory.

Sources are adapter directories, names of runs under `runs/`, or composition directories (which stand
for their adapters, e.g. the per-task adapters of a multi-task run). Modes:

- stack / average / parallel: copy the adapters in and record the mode and weights;
- merge: one merged adapter (vlkit.compose.merge), method linear | task_arithmetic | ties | concat | svd;
- fuse: AdapterFusion layers trained from a recipe with the adapters frozen (`vlkit.train.fuse`);
- route: train a router on the adapters' own training data (or `data`), report held-out accuracy;
- wise: one adapter interpolated towards the frozen backbone by `alpha` (WiSE-FT; see `vlkit.compose.composition`);
- gate: a route composition whose router is a domain gate calibrated on the adapters' own training data
  (`vlkit.compose.gate`): each input through the adapter it resembles, else the frozen backbone.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..adapters.files import read_adapter_config, read_adapter_weights
from ..backbones.loading import load_backbone
from ..errors import ConfigError, IncompatibleAdapterError
from ..outputs import OutputTarget
from .composition import MODES, write_composition
from .gate import GateOptions, calibrate_gate, recipe_seed, save_gate, training_data
from .merge import check_finite_weights, merge_adapters
from .predict import load_task
from .resolve import free_name, source_dirs
from .router import adapter_data_spec, save_router, train_router

COMPOSE_MODES = (*MODES, "gate")  # gate writes a route composition (its router a domain gate)

resolve_sources = source_dirs  # (name, adapter directory) per argument; see vlkit.compose.resolve


def _check_same_backbone(sources: list[tuple[str, Path]]) -> dict[str, Any]:
    """The first source's config, once every source reads (config and finite weights, in every mode) and all
    were made for one backbone."""

    cfgs = [read_adapter_config(p) for _, p in sources]
    for _, p in sources:
        read_adapter_weights(p)
    for (_, p), cfg in zip(sources[1:], cfgs[1:]):
        if cfg["backbone_fingerprint"] != cfgs[0]["backbone_fingerprint"]:
            raise IncompatibleAdapterError(
                f"adapters {sources[0][1]} and {p} were made for different backbones: {cfgs[0].get('backbone')!r} "
                f"({cfgs[0]['backbone_fingerprint']}) vs {cfg.get('backbone')!r} ({cfg['backbone_fingerprint']})"
            )
    return cfgs[0]


def _load_backbone_for(cfg0: dict[str, Any], spec: str | None = None):

    backbone = load_backbone(spec or cfg0["backbone"]).eval()
    if backbone.fingerprint() != cfg0["backbone_fingerprint"]:
        raise IncompatibleAdapterError(
            f"backbone {backbone.spec!r} (fingerprint {backbone.fingerprint()}) is not "
            f"the one the adapters were made for ({cfg0['backbone_fingerprint']})"
        )
    return backbone


def parse_data_items(items: list[str] | None) -> tuple[dict[str, Any], Any]:
    """`--data` items: NAME=SPEC gives adapter NAME's routing data ("none=SPEC": inputs for no adapter),
    a bare SPEC is one dataset (for fuse: the training data)."""
    per_name: dict[str, Any] = {}
    bare = None
    for item in items or []:
        key, sep, value = item.partition("=")
        if sep and key and "/" not in key and ":" not in key:
            per_name[key.strip()] = value.strip()
        else:
            bare = item
    return per_name, bare


def compose(
    sources: list[str] | str,
    mode: str,
    out: str | Path,
    *,
    weights: list[float] | None = None,
    method: str = "linear",
    rank: int | None = None,
    density: float = 0.2,
    data: list[str] | None = None,
    backbone: str | None = None,
    router_hidden: int = 64,
    router_steps: int = 300,
    n_per_adapter: int = 256,
    seed: int = 0,
    overwrite: bool = False,
    alpha: float | None = None,
    quantile: float = 0.0,
    score: str = "mahalanobis",
) -> dict[str, Any]:
    """Compose adapters into the directory `out`; returns a summary (what `vlkit compose --json` prints).

    `out` follows `vlkit.outputs`: never one of the sources, refused when not empty unless `overwrite`, and
    replaced whole once the composition is complete."""

    if mode not in COMPOSE_MODES:
        raise ConfigError(f"--mode must be one of {', '.join(COMPOSE_MODES)}, got {mode!r}")
    srcs = resolve_sources(sources)
    cfg0 = _check_same_backbone(srcs)
    out = Path(out)
    if weights is not None and len(weights) != len(srcs):
        raise ConfigError(f"{len(weights)} weights given for {len(srcs)} adapters ({', '.join(n for n, _ in srcs)})")
    if weights is not None:
        check_finite_weights(weights)
        if mode in ("route", "gate"):
            raise ConfigError(f"weights do not apply to mode {mode} (it picks one adapter per input)")
    if mode == "fuse":
        raise ConfigError(
            "mode fuse trains fusion layers: call vlkit.train.fuse.fuse_adapters (vlkit compose --mode fuse does)"
        )
    if mode in ("average", "parallel") and len(srcs) < 2:
        raise ConfigError(f"mode {mode} needs at least two adapters")
    if (mode == "wise") != (alpha is not None):
        raise ConfigError(
            "--alpha is mode wise's interpolation strength"
            if alpha is not None
            else "mode wise needs --alpha (0: the frozen backbone, 1: the adapter)"
        )
    if mode == "gate":
        GateOptions(quantile, score).validate()
    if mode == "wise":
        assert alpha is not None  # checked above
        if len(srcs) != 1 or weights is not None:
            raise ConfigError(f"mode wise interpolates one adapter (with --alpha, not --weights); got {len(srcs)}")
        check_finite_weights([alpha])
        if not 0.0 <= float(alpha) <= 1.0:
            raise ConfigError(f"--alpha must lie in [0, 1] (0: the frozen backbone, 1: the adapter), got {alpha}")
        weights = [float(alpha)]
    target = OutputTarget(out, overwrite=overwrite, inputs=[p for _, p in srcs], what="composition directory")
    target.check()
    with target:
        summary = _compose_into(
            target.staging,
            out,
            mode,
            srcs,
            cfg0,
            weights,
            method,
            rank,
            density,
            data,
            backbone,
            router_hidden,
            router_steps,
            n_per_adapter,
            seed,
            gate=GateOptions(quantile, score),
        )
    return summary


def _compose_into(
    stage: Path,
    out: Path,
    mode,
    srcs,
    cfg0,
    weights,
    method,
    rank,
    density,
    data,
    backbone,
    router_hidden,
    router_steps,
    n_per_adapter,
    seed,
    gate: GateOptions | None = None,
) -> dict[str, Any]:
    summary: dict[str, Any] = {
        "mode": mode,
        "output_dir": str(out),
        "adapters": [n for n, _ in srcs],
        "weights": weights,
    }
    if mode == "merge":
        cfg = merge_adapters(
            [p for _, p in srcs],
            stage,
            method=method,
            weights=weights,
            density=density,
            rank=rank,
            name=free_name(set(), out.name),
            labels=[str(p) for _, p in srcs],
        )
        summary.update(
            method=method,
            weights=cfg["composition"]["weights"],
            variant=cfg["variant"],
            config=cfg["config"],
            num_parameters=cfg["num_parameters"],
        )
        for k in ("svd_relative_error", "density"):
            if k in cfg["composition"]:
                summary[k] = cfg["composition"][k]
        return summary
    if mode in ("stack", "average", "parallel", "wise"):
        write_composition(stage, mode, cfg0, srcs, weights=weights)
        return summary if mode != "wise" else {**summary, "alpha": weights[0]}
    if mode == "gate":
        return {**summary, **_gate(srcs, cfg0, stage, data, backbone, gate or GateOptions())}
    return {**summary, **_route(srcs, cfg0, stage, data, backbone, router_hidden, router_steps, n_per_adapter, seed)}


def _gate(srcs, cfg0, out: Path, data, backbone_spec, options: GateOptions) -> dict[str, Any]:
    """A domain gate over the adapters, calibrated on each one's training data (its recipe's `data.train`, the
    few-shot draw included, or `--data NAME=SPEC`); no data for 'none': the gate needs no general-domain data."""
    import json

    per_name, bare = parse_data_items(data)
    names = [n for n, _ in srcs]
    if bare is not None or "none" in per_name:
        raise ConfigError(
            "--data for --mode gate is NAME=SPEC per adapter (its training data); the gate needs no data for "
            "'none' (inputs unlike every adapter's go to the frozen backbone)"
        )
    unknown = sorted(set(per_name) - set(names))
    if unknown:
        raise ConfigError(f"--data names {', '.join(unknown)}, which are not among the adapters ({', '.join(names)})")
    backbone = _load_backbone_for(cfg0, backbone_spec)
    if getattr(backbone, "kind", None) == "generative":
        raise ConfigError(f"--mode gate compares dual-encoder embeddings; {backbone.spec} is a generative backbone")
    sources = []
    for name, path in srcs:
        meta = json.loads((path / "task.json").read_text()) if (path / "task.json").is_file() else None
        given = per_name.get(name)
        ds = training_data(given, 0) if given else training_data(adapter_data_spec(path), recipe_seed(path))
        sources.append((name, ds, load_task(backbone, meta) or meta))
    gate, report = calibrate_gate(backbone, sources, options.quantile, options.score)
    out.mkdir(parents=True, exist_ok=True)
    entry = save_gate(gate, out, report)
    write_composition(out, "route", backbone, srcs, extra={"router": entry})
    return {"mode": "gate", "gate": report}


def _route(srcs, cfg0, out: Path, data, backbone_spec, hidden, steps, n_per_adapter, seed) -> dict[str, Any]:
    import json

    per_name, bare = parse_data_items(data)
    if bare is not None:
        raise ConfigError("--data for --mode route is NAME=SPEC per adapter (none=SPEC: inputs for no adapter)")
    names: list[str | None] = [n for n, _ in srcs]
    unknown = sorted(set(per_name) - set(names) - {"none"})
    if unknown:
        raise ConfigError(
            f"--data names {', '.join(unknown)}, which are not among the adapters ({', '.join(map(str, names))})"
        )
    backbone = _load_backbone_for(cfg0, backbone_spec)
    if getattr(backbone, "kind", None) == "generative":
        raise ConfigError(
            f"--mode route trains a router on dual-encoder embeddings; {backbone.spec} is a generative "
            "backbone: serve the adapters side by side (vlkit serve routes each request by its "
            "adapter) or compose them with --mode stack, parallel or merge"
        )
    sources = []
    for i, (name, path) in enumerate(srcs):
        spec = per_name.get(name) or adapter_data_spec(path)
        meta = json.loads((path / "task.json").read_text()) if (path / "task.json").is_file() else None
        sources.append((i, spec, meta))
    if "none" in per_name:
        names.append(None)
        sources.append((len(names) - 1, per_name["none"], None))
    router, report = train_router(
        backbone, names, sources, hidden=hidden, steps=steps, n_per_source=n_per_adapter, seed=seed
    )
    out.mkdir(parents=True, exist_ok=True)
    entry = save_router(router, out, report)
    write_composition(out, "route", backbone, srcs, extra={"router": entry})
    return {"routing": report}
