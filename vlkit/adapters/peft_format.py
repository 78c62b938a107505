"""PEFT's adapter directories, both ways, for transformers (`hf:`) backbones.

- **Reading** (`vlkit.load_adapter(backbone, dir)` on a directory whose adapter_config.json carries PEFT's
  `peft_type`): a PEFT LoRA (`peft_type: LORA`, saved by `PeftModel.save_pretrained`) becomes vlkit's own
  `lora` layers (rank r, alpha lora_alpha, or lora_alpha·√r for rsLoRA, so the scaling is PEFT's); a DoRA or a
  LoRA with per-module ranks / alphas becomes the `peft` bridge variant, which runs PEFT's own layer. The
  sites are the module paths of the saved tensors (`base_model.model.` stripped); every tensor must fit a
  projection of this backbone by name and shape (there is no fingerprint in a PEFT directory).
- **Writing** (`vlkit export --format peft`, `vlkit.export.peft.export_peft`): a `lora` adapter, or a `peft`
  bridge adapter of any tuner, trained on an `hf:` backbone (CLIP, SigLIP or a VLM) or on the language model of a
  `vl:` backbone, as a directory `peft.PeftModel.from_pretrained(model, dir)` loads onto that transformers model
  (adapter_config.json written by PEFT's own config class, target_modules the exact module paths). The
  export is verified: the directory is loaded with PEFT onto a fresh copy of the base model and its outputs
  are compared with vlkit's on random inputs; a mismatch writes nothing.

open_clip and tiny backbones keep their q/k/v projections inside nn.MultiheadAttention, which PEFT does not
address as modules of their own: their adapters cannot be written in PEFT's format (vlkit's own directory
format carries them).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from ..errors import AdapterFileError, IncompatibleAdapterError
from .files import read_tensor_file

PEFT_PREFIX = "base_model.model."
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
LORA_PARTS = ("lora_A.weight", "lora_B.weight", "lora_magnitude_vector")
EXPORT_TOLERANCE = 1e-5


def is_peft_dir(path: str | Path) -> bool:
    """Whether `path` holds a PEFT adapter config (a `peft_type` and no vlkit `format`)."""
    f = Path(path) / CONFIG_NAME
    if not f.is_file():
        return False
    try:
        cfg = json.loads(f.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, OSError):
        return False
    return isinstance(cfg, dict) and "peft_type" in cfg and "format" not in cfg


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    wfile = path / WEIGHTS_NAME
    if not wfile.is_file():
        raise AdapterFileError(
            f"{path} has no {WEIGHTS_NAME} (PEFT's .bin pickles are not read; save with safe_serialization=True)"
        )
    return read_tensor_file(wfile)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def check_peft_config(path: Path, cfg: dict[str, Any]) -> None:
    """AdapterFileError naming the file and key for a LoRA config value of the wrong type or range."""
    where = path / CONFIG_NAME

    def bad(key: str, want: str, value: Any) -> AdapterFileError:
        return AdapterFileError(f"{where}: {key} must be {want}, got {value!r}")

    def rank(key: str, v: Any) -> None:
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise bad(key, "a positive integer", v)

    if "r" in cfg:
        rank("r", cfg["r"])
    if "lora_alpha" in cfg and not _is_number(cfg["lora_alpha"]):
        raise bad("lora_alpha", "a number", cfg["lora_alpha"])
    drop = cfg.get("lora_dropout")
    if drop is not None and not (_is_number(drop) and 0 <= drop < 1):
        raise bad("lora_dropout", "a number in [0, 1)", drop)
    for key in ("use_dora", "use_rslora", "fan_in_fan_out"):
        if cfg.get(key) is not None and not isinstance(cfg[key], bool):
            raise bad(key, "true or false", cfg[key])
    for key, check in (("rank_pattern", rank), ("alpha_pattern", None)):
        pattern = cfg.get(key)
        if pattern is None:
            continue
        if not isinstance(pattern, dict):
            raise bad(key, "a mapping of module patterns to values", pattern)
        for name, v in pattern.items():
            if check is not None:
                check(f"{key}[{name!r}]", v)
            elif not _is_number(v):
                raise bad(f"{key}[{name!r}]", "a number", v)


def read_peft_dir(backbone, path: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """A PEFT LoRA directory as a vlkit adapter config and tensors (see the module docstring)."""
    path = Path(path)
    try:
        peft_cfg = json.loads((path / CONFIG_NAME).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AdapterFileError(f"{path / CONFIG_NAME} is not valid JSON: {exc}") from None
    if not isinstance(peft_cfg, dict):
        raise AdapterFileError(f"{path / CONFIG_NAME} is not a JSON object")
    ptype = str(peft_cfg.get("peft_type")).upper()
    if ptype != "LORA":
        raise AdapterFileError(
            f"{path} is a PEFT {ptype} adapter; vlkit reads PEFT LoRA directories (DoRA "
            "included); train other tuners in vlkit with adapter.variant=peft"
        )
    if peft_cfg.get("modules_to_save") or peft_cfg.get("lora_bias") or peft_cfg.get("bias", "none") != "none":
        raise AdapterFileError(
            f"{path}: modules_to_save / trained biases change base weights; vlkit adapters "
            "keep the backbone frozen and cannot load them"
        )
    check_peft_config(path, peft_cfg)
    raw = _read_weights(path)
    sites: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in raw.items():
        k = key[len(PEFT_PREFIX) :] if key.startswith(PEFT_PREFIX) else key
        part = next((p for p in LORA_PARTS if k.endswith("." + p)), None)
        if part is None:
            raise IncompatibleAdapterError(
                f"{path}: tensor {key} is not a LoRA tensor (lora_A / lora_B / "
                "lora_magnitude_vector); vlkit cannot load it"
            )
        sites.setdefault(k[: -len(part) - 1], {})[part] = t
    if not sites:
        raise AdapterFileError(f"{path}: {WEIGHTS_NAME} holds no tensors")
    linear = {s.path: s for b in backbone.all_blocks() for s in b.sites.values() if s.kind == "linear"}
    unknown = sorted(set(sites) - set(linear))
    if unknown:
        raise IncompatibleAdapterError(
            f"PEFT adapter {path} targets {len(unknown)} module(s) this backbone ({backbone.spec}) has no "
            f"projection at, e.g. {unknown[0]}",
            hint="PEFT directories load onto the transformers model they were made for (hf:<that model>)",
        )
    paths = [p for p in linear if p in sites]  # the backbone's order
    r, alpha = int(peft_cfg.get("r", 8)), float(peft_cfg.get("lora_alpha", 8))
    dora = bool(peft_cfg.get("use_dora"))
    patterns = bool(peft_cfg.get("rank_pattern") or peft_cfg.get("alpha_pattern"))
    for p in paths:
        if "lora_A.weight" not in sites[p] or "lora_B.weight" not in sites[p]:
            raise IncompatibleAdapterError(f"{path}: module {p} lacks lora_A or lora_B")
    if dora or patterns:
        keep = (
            "r",
            "lora_alpha",
            "lora_dropout",
            "use_dora",
            "use_rslora",
            "rank_pattern",
            "alpha_pattern",
            "init_lora_weights",
        )  # not fan_in_fan_out: vlkit hands every tuner its site's weight as (out, in), a Conv1D's transposed
        bridge = {"peft_type": "LORA", **{k: peft_cfg[k] for k in keep if k in peft_cfg and peft_cfg[k] is not None}}
        bridge["init_lora_weights"] = True
        bridge["target_modules"] = paths
        config: dict[str, Any] = {"config": bridge, "targets": paths}
        variant = "peft"
        weights = {}
        for p in paths:
            for part, t in sites[p].items():
                if part == "lora_magnitude_vector":
                    weights[f"{p}.tuner.lora_magnitude_vector.default.weight"] = t
                else:
                    name, leaf = part.split(".")
                    weights[f"{p}.tuner.{name}.default.{leaf}"] = t
    else:
        if peft_cfg.get("use_rslora"):
            alpha = alpha * math.sqrt(r)  # rsLoRA scales by alpha/√r; vlkit's LoRA by alpha/rank
        config = {"rank": r, "alpha": alpha, "dropout": float(peft_cfg.get("lora_dropout") or 0.0), "targets": paths}
        variant = "lora"
        weights = {}
        for p in paths:
            weights[f"{p}.lora_A"] = sites[p]["lora_A.weight"]
            weights[f"{p}.lora_B"] = sites[p]["lora_B.weight"]
    cfg = {
        "format": "peft",
        "variant": variant,
        "config": config,
        "name": "default",
        "backbone": base
        if isinstance(base := peft_cfg.get("base_model_name_or_path"), str) and base
        else backbone.spec,
        "backbone_fingerprint": backbone.fingerprint(),
        "task": {},
        "peft_config": peft_cfg,
    }
    return cfg, weights
