"""Adapter directories: `adapter_config.json` + `adapter_model.safetensors` (adapter weights only).

The names follow PEFT's, the schema is vlkit's own: `format` is "vlkit.adapter" and `format_note` says plainly
that PEFT cannot read the directory as is.

This module reads and checks the files (format, version, fingerprint, finite tensors); only safetensors are
read. Writing and loading onto a backbone are the owner's (`AdaptedModel.save_adapter` / `load_adapter`), which
checks every tensor's name and shape before anything is copied.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ..errors import AdapterFileError, IncompatibleAdapterError

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
FORMAT = "vlkit.adapter"
FORMAT_VERSION = 1
# the file names are PEFT's, the schema is not: say so in the file itself
FORMAT_NOTE = (
    "a vlkit adapter: PEFT's file names, vlkit's own schema (adapter_config.json is not a PEFT "
    "config); load it with vlkit.load_adapter"
)


def read_adapter_config(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise AdapterFileError(f"adapter directory {path} does not exist")
    if not path.is_dir():
        raise AdapterFileError(f"{path} is not an adapter directory (expected {CONFIG_NAME} and {WEIGHTS_NAME} inside)")
    cfg_file = path / CONFIG_NAME
    if not cfg_file.is_file():
        raise AdapterFileError(f"{path} has no {CONFIG_NAME}; not a vlkit adapter directory")
    try:
        cfg = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AdapterFileError(f"{cfg_file} is not valid JSON: {exc}") from None
    if isinstance(cfg, dict) and "peft_type" in cfg and "format" not in cfg:
        raise AdapterFileError(
            f"{cfg_file} is a PEFT adapter config (peft_type {cfg['peft_type']}); "
            "vlkit.load_adapter(backbone, dir) reads PEFT LoRA directories onto an hf: backbone"
        )
    if not isinstance(cfg, dict) or cfg.get("format") != FORMAT:
        fmt = cfg.get("format") if isinstance(cfg, dict) else None
        raise AdapterFileError(f"{cfg_file} is not a vlkit adapter config (format {fmt!r})")
    for key in ("variant", "config", "backbone_fingerprint"):
        if key not in cfg:
            raise AdapterFileError(f"{cfg_file} lacks the field {key!r}")
    if not isinstance(cfg["config"], dict) or not isinstance(cfg["variant"], str):
        raise AdapterFileError(f"{cfg_file}: 'variant' must be a string and 'config' an object of options")
    version = cfg.get("format_version", 0)
    if isinstance(version, bool) or not isinstance(version, int):
        raise AdapterFileError(f"{cfg_file} has format version {version!r}; expected an integer")
    if version > FORMAT_VERSION:
        raise AdapterFileError(f"{cfg_file} has format version {version}; this vlkit reads up to {FORMAT_VERSION}")
    return cfg


def check_finite(tensors: dict[str, torch.Tensor], file: str | Path) -> None:
    """Refuse (AdapterFileError naming `file`) floating-point tensors that hold NaN or inf values."""
    bad = sorted(k for k, v in tensors.items() if v.is_floating_point() and not torch.isfinite(v).all())
    if bad:
        raise AdapterFileError(
            f"{file} holds NaN or inf values in {len(bad)} tensor(s), e.g. {bad[0]}; refused (retrain or re-export it)"
        )


def read_tensor_file(file: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of one safetensors file (adapter weights, a head, fusion or router layers), refused when
    the file is corrupt or a floating-point tensor is not finite: every loading path goes through here."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(file))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise AdapterFileError(f"{file} is corrupt or not a safetensors file: {exc}") from None
    check_finite(tensors, file)
    return tensors


def read_adapter_weights(path: str | Path) -> dict[str, torch.Tensor]:
    wfile = Path(path) / WEIGHTS_NAME
    if not wfile.is_file():
        raise AdapterFileError(f"{Path(path)} has no {WEIGHTS_NAME}")
    return read_tensor_file(wfile)


def check_compatible(backbone, cfg: dict[str, Any], source: str) -> None:
    if cfg["backbone_fingerprint"] != backbone.fingerprint():
        raise IncompatibleAdapterError(
            f"adapter {source} was made for backbone {cfg.get('backbone')!r} (fingerprint "
            f"{cfg['backbone_fingerprint']}), but this backbone is {backbone.spec!r} "
            f"(fingerprint {backbone.fingerprint()})"
        )
