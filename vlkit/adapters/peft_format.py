"""PEFT's adapter directories, both ways, for transformers (`hf:`) backbones.

- **Reading** (`vlkit.load_adapter(backbone, dir)` on a directory whose adapter_config.json carries PEFT's
  `peft_type`): a PEFT LoRA (`peft_type: LORA`, saved by `PeftModel.save_pretrained`) becomes vlkit's own
  `lora` layers (rank r, alpha lora_alpha, or lora_alpha·√r for rsLoRA, so the scaling is PEFT's); a DoRA or a
  LoRA with per-module ranks / alphas becomes the `peft` bridge variant, which runs PEFT's own layer. The
  sites are the module paths of the saved tensors (`base_model.model.` stripped); every tensor must fit a
  projection of this backbone by name and shape (there is no fingerprint in a PEFT directory).
- **Writing** (`vlkit export --format peft`, `export_peft`): a `lora` adapter, or a `peft` bridge adapter of
  any tuner, trained on an `hf:` backbone, as a directory `peft.PeftModel.from_pretrained(CLIPModel, dir)`
  loads (adapter_config.json written by PEFT's own config class, target_modules the exact module paths). The
  export is verified: the directory is loaded with PEFT onto a fresh copy of the base model and its image and
  text embeddings are compared with vlkit's on random inputs; a mismatch writes nothing.

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

from ..errors import AdapterFileError, ConfigError, IncompatibleAdapterError

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
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    wfile = path / WEIGHTS_NAME
    if not wfile.is_file():
        raise AdapterFileError(f"{path} has no {WEIGHTS_NAME} (PEFT's .bin pickles are not read; "
                               "save with safe_serialization=True)")
    try:
        return load_file(str(wfile))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise AdapterFileError(f"{wfile} is corrupt or not a safetensors file: {exc}") from None


def read_peft_dir(backbone, path: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """A PEFT LoRA directory as a vlkit adapter config and tensors (see the module docstring)."""
    path = Path(path)
    peft_cfg = json.loads((path / CONFIG_NAME).read_text())
    ptype = str(peft_cfg.get("peft_type")).upper()
    if ptype != "LORA":
        raise AdapterFileError(f"{path} is a PEFT {ptype} adapter; vlkit reads PEFT LoRA directories (DoRA "
                               "included); train other tuners in vlkit with adapter.variant=peft")
    if peft_cfg.get("modules_to_save") or peft_cfg.get("lora_bias") or peft_cfg.get("bias", "none") != "none":
        raise AdapterFileError(f"{path}: modules_to_save / trained biases change base weights; vlkit adapters "
                               "keep the backbone frozen and cannot load them")
    raw = _read_weights(path)
    sites: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in raw.items():
        k = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
        part = next((p for p in LORA_PARTS if k.endswith("." + p)), None)
        if part is None:
            raise IncompatibleAdapterError(f"{path}: tensor {key} is not a LoRA tensor (lora_A / lora_B / "
                                           "lora_magnitude_vector); vlkit cannot load it")
        sites.setdefault(k[: -len(part) - 1], {})[part] = t
    if not sites:
        raise AdapterFileError(f"{path}: {WEIGHTS_NAME} holds no tensors")
    linear = {s.path: s for b in backbone.all_blocks() for s in b.sites.values() if s.kind == "linear"}
    unknown = sorted(set(sites) - set(linear))
    if unknown:
        raise IncompatibleAdapterError(
            f"PEFT adapter {path} targets {len(unknown)} module(s) this backbone ({backbone.spec}) has no "
            f"projection at, e.g. {unknown[0]}", hint="PEFT directories load onto the transformers model they were "
                                                     "made for (hf:<that model>)")
    paths = [p for p in linear if p in sites]  # the backbone's order
    r, alpha = int(peft_cfg.get("r", 8)), float(peft_cfg.get("lora_alpha", 8))
    dora = bool(peft_cfg.get("use_dora"))
    patterns = bool(peft_cfg.get("rank_pattern") or peft_cfg.get("alpha_pattern"))
    for p in paths:
        if "lora_A.weight" not in sites[p] or "lora_B.weight" not in sites[p]:
            raise IncompatibleAdapterError(f"{path}: module {p} lacks lora_A or lora_B")
    if dora or patterns:
        keep = ("r", "lora_alpha", "lora_dropout", "use_dora", "use_rslora", "rank_pattern", "alpha_pattern",
                "fan_in_fan_out", "init_lora_weights")
        bridge = {"peft_type": "LORA", **{k: peft_cfg[k] for k in keep if k in peft_cfg and peft_cfg[k] is not None}}
        bridge["init_lora_weights"] = True
        bridge["target_modules"] = paths
        config = {"config": bridge, "targets": paths}
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
        config = {"rank": r, "alpha": alpha, "dropout": float(peft_cfg.get("lora_dropout") or 0.0),
                  "targets": paths}
        variant = "lora"
        weights = {}
        for p in paths:
            weights[f"{p}.lora_A"] = sites[p]["lora_A.weight"]
            weights[f"{p}.lora_B"] = sites[p]["lora_B.weight"]
    cfg = {"format": "peft", "variant": variant, "config": config, "name": "default",
           "backbone": peft_cfg.get("base_model_name_or_path") or backbone.spec,
           "backbone_fingerprint": backbone.fingerprint(), "task": {}, "peft_config": peft_cfg}
    return cfg, weights


# --- writing ------------------------------------------------------------------------------------------------------

def _peft_tensors_and_config(backbone, name: str) -> tuple[dict[str, torch.Tensor], Any]:
    """PEFT's state-dict keys and config object for adapter `name` (a `lora` or a `peft` bridge adapter)."""
    from .inject import adapter_parameters
    from .peft_bridge import peft_config_class, _peft_config, _site_name

    record = backbone.adapter_records[name]
    params = adapter_parameters(backbone, name)
    if record.extra:
        raise ConfigError(f"adapter {name!r} also trains backbone parameters ({', '.join(sorted(record.extra))}); "
                          "a PEFT directory holds adapter tensors only")
    paths = [s.path for s in record.sites]
    if any("#" in p for p in paths) or backbone.family != "hf":
        raise ConfigError(f"PEFT's format addresses transformers modules; {backbone.spec} ({backbone.family}) keeps "
                          "its q/k/v inside nn.MultiheadAttention, which PEFT does not target as modules",
                          hint="export --format peft takes adapters trained on hf: backbones")
    c = record.config
    out: dict[str, torch.Tensor] = {}
    if record.variant == "lora":
        from peft import LoraConfig

        pcfg = LoraConfig(r=int(c["rank"]), lora_alpha=float(c["alpha"]), lora_dropout=float(c.get("dropout", 0.0)),
                          target_modules=paths)
        for p in paths:
            out[f"{PEFT_PREFIX}{p}.lora_A.weight"] = params[f"{p}.lora_A"]
            out[f"{PEFT_PREFIX}{p}.lora_B.weight"] = params[f"{p}.lora_B"]
        return out, pcfg
    if record.variant == "peft":
        bridge = dict(c["config"])
        ff = [s.path for s in record.sites
              if bridge["peft_type"] == "IA3" and any(_site_name(s) == f or _site_name(s).endswith("." + f)
                                                       for f in (bridge.get("feedforward_modules") or []))]
        pcfg = _peft_config(bridge, feedforward=False)
        pcfg.target_modules = set(paths)
        if bridge["peft_type"] == "IA3":
            pcfg.feedforward_modules = set(ff)
        peft_config_class(bridge["peft_type"])
        for key, t in params.items():
            site, _, rest = key.partition(".tuner.")
            parts = [x for x in rest.split(".") if x != "default"]
            if parts[-1] == "weight" and parts[0] == "lora_magnitude_vector":
                parts = parts[:-1]
            out[f"{PEFT_PREFIX}{site}.{'.'.join(parts)}"] = t
        return out, pcfg
    raise ConfigError(f"adapter {name!r} is a {record.variant} adapter; PEFT's format holds lora and peft adapters",
                      hint="train with adapter.variant=lora or adapter.variant=peft")


def write_peft_dir(backbone, name: str, path: str | Path) -> Path:
    """Write adapter `name` of an hf backbone as a PEFT adapter directory at `path`."""
    from ..io import save_safetensors

    tensors, pcfg = _peft_tensors_and_config(backbone, name)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    src = backbone.spec.split(":", 1)[1] if backbone.spec.startswith("hf:") else backbone.spec
    pcfg.base_model_name_or_path = src
    pcfg.inference_mode = True
    pcfg.save_pretrained(str(path))
    save_safetensors({k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}, path / WEIGHTS_NAME,
                     metadata={"format": "pt"})
    return path


def peft_reference(spec: str, path: str | Path):
    """A fresh backbone for `spec` whose model PEFT's `PeftModel.from_pretrained` has wrapped with `path`."""
    from peft import PeftModel

    from .. import load_backbone

    ref = load_backbone(spec)
    PeftModel.from_pretrained(ref.model, str(path)).eval()  # injects PEFT's layers into ref.model in place
    return ref


def compare(a, b, seed: int = 0, n: int = 3) -> dict[str, float]:
    """Max abs differences of normalised image and text embeddings of two backbones on the same random inputs."""
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randn(n, 3, a.image_size, a.image_size, generator=g)
    tokens = a.tokenize(["a photo of a cat", "the hat", "a"][:n])
    with torch.no_grad():
        return {"image": float((a.encode_image(pixels, normalize=True) - b.encode_image(pixels, normalize=True)).abs().max()),
                "text": float((a.encode_text(tokens, normalize=True) - b.encode_text(tokens, normalize=True)).abs().max())}


def export_peft(out: str | Path, adapter: str | Path, *, backbone: str | None = None, overwrite: bool = False,
                seed: int = 0) -> dict[str, Any]:
    """`vlkit export --format peft`: write `adapter` as a PEFT directory at `out`, verified through PEFT itself."""
    from .. import load_backbone
    from ..errors import ExportError
    from ..outputs import OutputTarget
    from .files import load_adapter, read_adapter_config

    output = OutputTarget(out, overwrite=overwrite, inputs=[adapter], what="PEFT adapter directory")
    output.check()
    cfg = read_adapter_config(adapter)
    spec = backbone or cfg.get("backbone")
    if not spec or not str(spec).startswith("hf:"):
        raise ConfigError(f"--format peft writes adapters of transformers backbones (hf:...); this adapter is for "
                          f"{spec!r}", hint="open_clip / tiny adapters stay in vlkit's format (vlkit.load_adapter)")
    bb = load_backbone(spec)
    rec = load_adapter(bb, adapter)
    with output:
        write_peft_dir(bb, rec.name, output.staging)
        diffs = compare(bb, peft_reference(spec, output.staging), seed=seed)
        worst = max(diffs.values())
        if not worst <= EXPORT_TOLERANCE:
            raise ExportError(f"PEFT's model differs from vlkit's by {worst:.3g} (tolerance {EXPORT_TOLERANCE:g}); "
                              f"nothing was written to {out}")
    return {"format": "peft", "out": str(out), "adapter": str(adapter), "variant": rec.variant,
            "backbone": spec, "modules": len(rec.sites), "max_abs_diff": diffs, "tolerance": EXPORT_TOLERANCE,
            "written": [CONFIG_NAME, WEIGHTS_NAME]}
