"""Training checkpoints without pickle: tensors in safetensors, everything else in JSON, written atomically.

A checkpoint directory holds `trainable.safetensors` (trainable parameters and head), `optimizer.safetensors`
(optimizer state tensors), `rng.safetensors` (torch RNG states) and `state.json` (step, epoch, scheduler,
optimizer hyper-parameters, Python and NumPy RNG states). `latest` names the newest complete one.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..adapters.files import check_finite
from ..errors import ConfigError
from ..io import file_mode, write_text

CKPT_DIR = "checkpoints"


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"{pid}.{k}"] = v.detach().cpu().contiguous().clone()
            else:
                scalars[f"{pid}.{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _restore_optimizer(optimizer, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    state: dict[int, dict[str, Any]] = {}
    for key, t in tensors.items():
        pid, k = key.split(".", 1)
        state.setdefault(int(pid), {})[k] = t
    for key, v in meta["scalars"].items():
        pid, k = key.split(".", 1)
        state.setdefault(int(pid), {})[k] = v
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def save_checkpoint(
    run_dir: Path,
    step: int,
    trainable: dict[str, torch.Tensor],
    optimizer,
    scheduler,
    extra: dict[str, Any],
    keep: int = 2,
) -> Path:
    from safetensors.torch import save_file

    root = Path(run_dir) / CKPT_DIR
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    tmp = root / f".step-{step:08d}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_file(
        {k: v.detach().cpu().contiguous().clone() for k, v in trainable.items()}, str(tmp / "trainable.safetensors")
    )
    opt_tensors, opt_meta = _optimizer_tensors(optimizer)
    save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
    save_file({"torch": torch.get_rng_state()}, str(tmp / "rng.safetensors"))
    np_state: Any = np.random.get_state()
    state = {
        "step": step,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "optimizer": opt_meta,
        "python_rng": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
        "numpy_rng": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        **extra,
    }
    (tmp / "state.json").write_text(json.dumps(state, default=str))
    mode = file_mode()
    for f in tmp.iterdir():
        os.chmod(f, mode)  # safetensors writes 0600
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    write_text(root / "latest", final.name + "\n")
    ckpts = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-"))
    for old in ckpts[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(run_dir: Path) -> Path | None:
    root = Path(run_dir) / CKPT_DIR
    pointer = root / "latest"
    if pointer.is_file():
        cand = root / pointer.read_text().strip()
        if (cand / "state.json").is_file():
            return cand
    ckpts = sorted(p for p in root.glob("step-*") if (p / "state.json").is_file()) if root.is_dir() else []
    return ckpts[-1] if ckpts else None


def load_checkpoint(ckpt: Path, params: dict[str, torch.nn.Parameter], optimizer, scheduler) -> dict[str, Any]:
    from safetensors.torch import load_file

    try:
        state = json.loads((ckpt / "state.json").read_text())
        trainable = load_file(str(ckpt / "trainable.safetensors"))
        opt_tensors = load_file(str(ckpt / "optimizer.safetensors"))
        rng = load_file(str(ckpt / "rng.safetensors"))
    except Exception as exc:
        raise ConfigError(f"checkpoint {ckpt} cannot be read: {exc}") from None
    check_finite(trainable, ckpt / "trainable.safetensors")  # a diverged run is not resumed
    if set(trainable) != set(params):
        raise ConfigError(
            f"checkpoint {ckpt} does not match this run's trainable parameters "
            f"(different recipe?): {len(set(trainable) ^ set(params))} names differ"
        )
    shapes = [k for k, p in params.items() if tuple(trainable[k].shape) != tuple(p.shape)]
    if shapes:
        k = shapes[0]
        raise ConfigError(
            f"checkpoint {ckpt} does not match this run: {len(shapes)} parameter(s) changed shape, "
            f"e.g. {k} {tuple(trainable[k].shape)} in the checkpoint vs {tuple(params[k].shape)} now "
            "(the adapter options changed since the checkpoint)"
        )
    missing = [
        k for k in ("step", "optimizer", "python_rng", "numpy_rng") if not isinstance(state, dict) or k not in state
    ]
    if missing or "torch" not in rng:
        raise ConfigError(f"checkpoint {ckpt} is damaged: state.json lacks {', '.join(missing) or 'the torch RNG'}")
    try:
        with torch.no_grad():
            for k, p in params.items():
                p.copy_(trainable[k].to(p.dtype))
        _restore_optimizer(optimizer, opt_tensors, state["optimizer"])
        if scheduler is not None and state.get("scheduler") is not None:
            scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(rng["torch"])
        py = state["python_rng"]
        random.setstate((py[0], tuple(py[1]), py[2]))
        npst = state["numpy_rng"]
        np.random.set_state((npst[0], np.array(npst[1], dtype=np.uint32), npst[2], npst[3], npst[4]))
    except (KeyError, ValueError, TypeError, IndexError, RuntimeError) as exc:
        raise ConfigError(f"checkpoint {ckpt} is damaged or does not match this run: {exc}") from None
    return state
