"""Keeping the general domain after few-shot adaptation (issue 26): the adapter behind a domain gate.

A few-shot domain adapter changes the backbone for every input, so the general domain it never saw loses
accuracy: on the embedded world a bottleneck adapter trained on 16 satellite shots keeps about 75% of the photo
domain's zero-shot accuracy. Interpolating it towards the frozen backbone (WiSE-FT, `vlkit compose --mode wise`)
or pulling its features towards the frozen ones while it trains (PromptSRC / KgCoOp-style consistency) keeps the
photo domain only where the adapter's in-domain gain is small (medical, sketch), not where the new domain needs a
large change (satellite). What keeps both is not to run the adapter on inputs unlike those it was trained on:
`vlkit.compose.gate` fits a gate to the frozen backbone's embeddings of the adapter's own training images
(Mahalanobis distance, threshold from held-out training images) and texts (nearest neighbour), with no
general-domain data and no extra training, and routes every other input to the frozen backbone.

`vlkit adapt` does this by default (`gate=True`): after training it calibrates the gate on the few-shot training
set, writes the gated adapter as a route composition into `OUT/gated/` (load, evaluate or serve it like any
composition: `vlkit eval --adapters OUT/gated`), and adds the table row "<variant> adapter, gated" with its
in-domain accuracy and the general domain's retention next to the ungated adapter's.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..adapters.files import read_adapter_config
from ..adapters.model import AdaptedModel
from ..compose.composition import write_composition
from ..compose.gate import DomainGate, calibrate_gate, save_gate
from ..compose.router import route
from ..errors import ConfigError
from ..tasks.base import prepare_pixels
from .jobs import load_datasets

GATED_DIR = "gated"


def gate_run(backbone, task, train_ds, adapter_dir: Path, quantile: float = 0.0) -> tuple[DomainGate, dict[str, Any]]:
    """The gate of a trained run: calibrated on its training set `train_ds` (the frozen backbone's embeddings of its
    images and of its task's texts) for the adapter saved in `adapter_dir`, named as the backbone has it loaded."""
    name = str(read_adapter_config(adapter_dir).get("name") or adapter_dir.name)
    return calibrate_gate(backbone, [(name, train_ds, task)], quantile)


def write_gated(out: Path, backbone, gate: DomainGate, report: dict[str, Any], adapter_dir: Path) -> Path:
    """`out` as a route composition: the adapter of `adapter_dir` copied in, the gate as its router."""
    out.mkdir(parents=True, exist_ok=True)
    entry = save_gate(gate, out, report)
    name = gate.names[0]
    assert name is not None, "a gate's first name is its adapter"
    write_composition(out, "route", backbone, [(name, adapter_dir)], extra={"router": entry})
    return out


def routed_share(backbone, gate: DomainGate, ds) -> float:
    """Percent of `ds`'s images that the gate sends to an adapter (not to the frozen backbone)."""
    pixels = prepare_pixels(backbone, ds).materialize()
    if len(pixels) == 0:
        return 0.0
    with torch.no_grad():
        idx = route(backbone, gate, pixels=pixels)
    return 100.0 * float((idx != len(gate.names) - 1).double().mean())


def gated_adapter(
    backbone,
    task,
    cfg,
    out: Path,
    frozen_general: float,
    measure: Callable[[Any], tuple[float, dict[str, Any]]],
    variant: str,
    result: dict[str, Any],
    quantile: float = 0.0,
) -> dict[str, Any]:
    """`vlkit adapt`'s gated row: the run's adapter (saved in `out`, active on `backbone`) behind a gate calibrated
    on the recipe `cfg`'s training set, written to `out/gated/`; its in-domain score (the trained `task` on the
    recipe's eval set) and what `measure(view)` returns, (general score, cross-domain entry), through the gate's
    view of `backbone`, with the gate's thresholds and the share of in-domain test images it sends to the
    adapter. `result` is the run's (its trainable share)."""
    train_ds, eval_ds = load_datasets(cfg)
    gate, report = gate_run(backbone, task, train_ds, out, quantile)
    write_gated(out / GATED_DIR, backbone, gate, report, out)
    view = gate.view(backbone)
    with torch.no_grad():
        in_domain = float(task.evaluate(view, task.prepare(backbone, eval_ds))[task.metric])
    general, cross = measure(view)
    per = next(iter(report["per_adapter"].values()))
    return {
        "method": f"{variant} adapter, gated",
        "trainable_percent": result["parameters"]["trainable_percent"],
        "in_domain": in_domain,
        "general": general,
        "general_change": general - frozen_general,
        **cross,
        "gate": {
            "score": report["score"],
            "quantile": report["quantile"],
            "image_threshold": per["image_threshold"],
            "text_threshold": per["text_threshold"],
            "train_images": per["images"],
            "in_domain_routed_percent": routed_share(backbone, gate, eval_ds),
            "dir": GATED_DIR,
        },
    }


def gated_scores(
    backbone, task, train_ds, eval_ds, general: Callable[[Any], float] | None, quantile: float = 0.0
) -> dict[str, Any]:
    """A protocol run's scores behind a gate calibrated on its training set (nothing written): `gated_accuracy` of
    the trained `task` on `eval_ds`, `gated_general` (`general(view)`) and `gated_routed` (percent of the in-domain
    test images sent to the adapter). The backbone's one active adapter is the one gated."""
    names = AdaptedModel.of(backbone).active_adapters
    if len(names) != 1:
        raise ConfigError(f"gated_scores gates one active adapter; {len(names)} are active")
    gate, _ = calibrate_gate(backbone, [(names[0], train_ds, task)], quantile)
    view = gate.view(backbone)
    with torch.no_grad():
        out: dict[str, Any] = {
            "gated_accuracy": float(task.evaluate(view, task.prepare(backbone, eval_ds))[task.metric])
        }
    if general is not None:
        out["gated_general"] = general(view)
    out["gated_routed"] = routed_share(backbone, gate, eval_ds)
    return out
