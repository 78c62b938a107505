"""Adapter directories: `adapter_config.json` + `adapter_model.safetensors` (adapter weights only).

The names follow PEFT's, the schema is vlkit's own: `format` is "vlkit.adapter" and `format_note` says plainly
that PEFT cannot read the directory as is.

Loading checks format, variant, backbone fingerprint and every tensor's name and shape before anything
is copied; only safetensors are read. Writes are atomic (temporary file, then rename).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from .. import __version__
from ..errors import AdapterFileError, ConfigError, IncompatibleAdapterError, UnknownNameError
from ..io import atomic_path, save_safetensors, write_json
from ..plugins import registry

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
FORMAT = "vlkit.adapter"
FORMAT_VERSION = 1
# the file names are PEFT's, the schema is not: say so in the file itself
FORMAT_NOTE = ("a vlkit adapter: PEFT's file names, vlkit's own schema (adapter_config.json is not a PEFT "
               "config); load it with vlkit.load_adapter")


def adapter_config(backbone, name: str, task: dict | None = None, extra: dict | None = None) -> dict[str, Any]:
    from .inject import adapter_parameters

    record = backbone.adapter_records[name]
    entry = registry("adapter").entry(record.variant)
    params = adapter_parameters(backbone, name)
    cfg = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "format_note": FORMAT_NOTE,
        "vlkit_version": __version__,
        "name": name,
        "variant": record.variant,
        "variant_plugin": entry.plugin,
        "config": record.config,
        "backbone": backbone.spec,
        "backbone_family": backbone.family,
        "backbone_fingerprint": backbone.fingerprint(),
        "targets": record.targets,
        "sites": [{"path": x.path, "tower": x.tower, "layer": x.layer, "role": x.role} for x in record.sites],
        "extra_trainable": sorted(record.extra),
        "num_parameters": int(sum(t.numel() for t in params.values())),
        "task": task if task is not None else record.task,
    }
    if extra:
        cfg.update(extra)
    return cfg


def save_adapter(backbone, path: str | Path, name: str = "default", *, task: dict | None = None,
                 extra: dict | None = None) -> Path:
    """Write adapter `name` of `backbone` to directory `path`; returns the directory."""
    from .inject import adapter_parameters

    if name not in backbone.adapter_records:
        raise UnknownNameError("adapter", name, list(backbone.adapter_records))
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in adapter_parameters(backbone, name).items()}
    bad = sorted(k for k, v in tensors.items() if v.is_floating_point() and not torch.isfinite(v).all())
    if bad:
        raise ConfigError(f"adapter {name!r} holds NaN or inf values in {len(bad)} tensor(s), e.g. {bad[0]} "
                          "(training diverged?); nothing was written")
    save_safetensors(tensors, path / WEIGHTS_NAME, metadata={"format": "pt", "vlkit_adapter": name})
    write_json(path / CONFIG_NAME, adapter_config(backbone, name, task, extra))
    return path


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
        raise AdapterFileError(f"{cfg_file} is a PEFT adapter config (peft_type {cfg['peft_type']}); "
                               "vlkit.load_adapter(backbone, dir) reads PEFT LoRA directories onto an hf: backbone")
    if not isinstance(cfg, dict) or cfg.get("format") != FORMAT:
        raise AdapterFileError(f"{cfg_file} is not a vlkit adapter config (format {cfg.get('format') if isinstance(cfg, dict) else None!r})")
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


def read_adapter_weights(path: str | Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    wfile = Path(path) / WEIGHTS_NAME
    if not wfile.is_file():
        raise AdapterFileError(f"{Path(path)} has no {WEIGHTS_NAME}")
    try:
        return load_file(str(wfile))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise AdapterFileError(f"{wfile} is corrupt or not a safetensors file: {exc}") from None


def check_compatible(backbone, cfg: dict[str, Any], source: str) -> None:
    if cfg["backbone_fingerprint"] != backbone.fingerprint():
        raise IncompatibleAdapterError(
            f"adapter {source} was made for backbone {cfg.get('backbone')!r} (fingerprint "
            f"{cfg['backbone_fingerprint']}), but this backbone is {backbone.spec!r} (fingerprint {backbone.fingerprint()})")


def load_adapter(backbone, path: str | Path, name: str | None = None, *, activate: bool = True,
                 trainable: bool = False):
    """Load an adapter directory onto `backbone` under `name` (default: its saved name).

    Several adapters can be loaded side by side; `backbone.set_active(...)` switches between them.
    A PEFT LoRA directory (`PeftModel.save_pretrained`, adapter_config.json with `peft_type`) loads too, as
    vlkit's `lora` layers (DoRA: the `peft` bridge); see vlkit.adapters.peft_format.
    """
    from .inject import adapter_layers, inject, remove_adapter

    from .peft_format import is_peft_dir, read_peft_dir

    if is_peft_dir(path):  # PEFT's own schema (peft_type): converted to vlkit's layers (vlkit.adapters.peft_format)
        cfg, weights = read_peft_dir(backbone, path)
    else:
        cfg = read_adapter_config(path)
        check_compatible(backbone, cfg, str(path))
        weights = None
    variant = cfg["variant"]
    if variant not in registry("adapter"):
        raise UnknownNameError("adapter variant", variant, registry("adapter").names())
    weights = read_adapter_weights(path) if weights is None else weights
    name = name or cfg.get("name") or "default"
    if name in backbone.adapter_records:
        raise ConfigError(f"an adapter named {name!r} is already loaded; pass another name")
    previous = backbone.adapter_state.active
    record = inject(backbone, variant, name=name, trainable=trainable, **cfg["config"])
    try:
        expected: dict[str, torch.Tensor] = {}
        for spath, layer in adapter_layers(backbone, name).items():
            for pname, t in layer.state_dict().items():
                expected[f"{spath}.{pname}"] = t
        for pname, p in record.extra.items():
            expected[f"base::{pname}"] = p.data
        missing = sorted(set(expected) - set(weights))
        unexpected = sorted(set(weights) - set(expected))
        if missing or unexpected:
            raise IncompatibleAdapterError(
                f"adapter {path} does not fit: {len(missing)} tensors missing (e.g. {missing[:2]}), "
                f"{len(unexpected)} unexpected (e.g. {unexpected[:2]})")
        for key, t in expected.items():
            if tuple(weights[key].shape) != tuple(t.shape):
                raise IncompatibleAdapterError(
                    f"adapter {path}: tensor {key} has shape {tuple(weights[key].shape)}, expected {tuple(t.shape)}")
        with torch.no_grad():
            for key, t in expected.items():
                t.copy_(weights[key].to(dtype=t.dtype, device=t.device))
    except Exception:
        remove_adapter(backbone, name)
        backbone.adapter_state.active = previous
        raise
    record.task = cfg.get("task") or {}
    if not activate:
        backbone.adapter_state.active = previous
    return record
