"""`vlkit export --format peft`: a `lora` adapter, or a `peft` bridge adapter of any tuner, written as a directory that
`peft.PeftModel.from_pretrained(model, dir)` loads onto the transformers model it was trained on (adapter_config.json
written by PEFT's own config class, target_modules the exact module paths):

- `hf:` CLIP / SigLIP backbones and `hf:` VLMs (LLaVA, Idefics3/SmolVLM, BLIP, vision-encoder-decoder): the
  transformers model of the directory;
- `vl:` composed backbones: their language model (`lm=DIR`), for adapters on its sites only (`towers: lm`).

GPT-2's projections are transformers `Conv1D`s (weight stored (in, out)): PEFT wraps them with `fan_in_fan_out=True`,
which the config says; their LoRA factors are the same tensors as for an nn.Linear. (A model with both, a ViT encoder
and a GPT-2 decoder, gets True: PEFT sets the flag of each nn.Linear back to False, with a warning.)

The export is verified: the directory is loaded with PEFT onto a fresh copy of the base model and its outputs are
compared with vlkit's on random inputs (CLIP: image and text embeddings; VLMs: answer log-probabilities; `vl:`
language models: logits); a mismatch writes nothing. Reading PEFT directories is `vlkit.adapters.peft_format`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..adapters.files import read_adapter_config
from ..adapters.model import AdaptedModel
from ..adapters.peft_bridge import _peft_config, _site_name, peft_config_class
from ..adapters.peft_format import CONFIG_NAME, EXPORT_TOLERANCE, PEFT_PREFIX, WEIGHTS_NAME
from ..backbones.base import resolve_module
from ..backbones.composed import load_lm, parse_vl_spec
from ..backbones.hosts import is_conv1d
from ..backbones.loading import load_backbone
from ..errors import ConfigError, ExportError
from ..io import save_safetensors
from ..outputs import OutputTarget

PEFT_FAMILIES = ("hf", "hf-vlm", "vl")


def peft_target(backbone) -> tuple[Any, str, str]:
    """(the transformers model PEFT wraps, the prefix of its module paths among the backbone's site paths, the
    directory or hub id it loads from)."""
    if backbone.family not in PEFT_FAMILIES:
        raise ConfigError(
            f"PEFT's format addresses transformers modules; {backbone.spec} ({backbone.family}) keeps "
            "its q/k/v inside nn.MultiheadAttention, which PEFT does not target as modules",
            hint="export --format peft takes adapters trained on hf: and vl: backbones",
        )
    if backbone.family == "vl":
        return backbone.model.lm, "lm.", parse_vl_spec(backbone.spec)["lm"]
    spec = backbone.spec
    return backbone.model, "", spec.split(":", 1)[1] if spec.startswith("hf:") else spec


def _peft_tensors_and_config(backbone, name: str) -> tuple[dict[str, torch.Tensor], Any]:
    """PEFT's state-dict keys and config object for adapter `name` (a `lora` or a `peft` bridge adapter)."""
    model = AdaptedModel.of(backbone)
    record = model.adapter(name).record
    params = model.adapter_parameters(name)
    if record.extra:
        raise ConfigError(
            f"adapter {name!r} also trains backbone parameters ({', '.join(sorted(record.extra))}); "
            "a PEFT directory holds adapter tensors only"
        )
    _, root, _ = peft_target(backbone)
    outside = sorted({s.tower for s in record.sites if not s.path.startswith(root)})
    if outside:
        raise ConfigError(
            f"adapter {name!r} has sites in the {', '.join(outside)} tower(s) of {backbone.spec}; "
            "PEFT's directory here is for its language model alone",
            hint="train the adapter with towers: lm",
        )
    if any("#" in s.path for s in record.sites):
        raise ConfigError(
            f"adapter {name!r} targets projections inside nn.MultiheadAttention, which PEFT does not target as modules"
        )
    params = {k[len(root) :]: v for k, v in params.items()}
    paths = [s.path[len(root) :] for s in record.sites]
    transposed = any(is_conv1d(resolve_module(backbone.model, s.host_path)) for s in record.sites)
    c = record.config
    out: dict[str, torch.Tensor] = {}
    if record.variant == "lora":
        from peft import LoraConfig

        alpha: Any = float(c["alpha"])  # PEFT annotates lora_alpha as int; vlkit's alphas may be fractional
        pcfg = LoraConfig(
            r=int(c["rank"]),
            lora_alpha=alpha,
            lora_dropout=float(c.get("dropout", 0.0)),
            target_modules=paths,
            fan_in_fan_out=transposed,  # GPT-2's Conv1D: PEFT's flag for a weight stored (in, out)
        )
        for p in paths:
            out[f"{PEFT_PREFIX}{p}.lora_A.weight"] = params[f"{p}.lora_A"]
            out[f"{PEFT_PREFIX}{p}.lora_B.weight"] = params[f"{p}.lora_B"]
        return out, pcfg
    if record.variant == "peft":
        bridge = dict(c["config"])
        ff = [
            s.path[len(root) :]
            for s in record.sites
            if bridge["peft_type"] == "IA3"
            and any(
                _site_name(s) == f or _site_name(s).endswith("." + f) for f in (bridge.get("feedforward_modules") or [])
            )
        ]
        pcfg = _peft_config(bridge, feedforward=False)
        pcfg.target_modules = set(paths)
        if hasattr(pcfg, "fan_in_fan_out"):  # the bridge ran the tuner on (out, in) weights; PEFT's Conv1D wants it
            pcfg.fan_in_fan_out = transposed
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
    raise ConfigError(
        f"adapter {name!r} is a {record.variant} adapter; PEFT's format holds lora and peft adapters",
        hint="train with adapter.variant=lora or adapter.variant=peft",
    )


def write_peft_dir(backbone, name: str, path: str | Path) -> Path:
    """Write adapter `name` of an hf or vl backbone as a PEFT adapter directory at `path` (see `peft_target`)."""
    tensors, pcfg = _peft_tensors_and_config(backbone, name)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    pcfg.base_model_name_or_path = peft_target(backbone)[2]
    pcfg.inference_mode = True
    pcfg.save_pretrained(str(path))
    save_safetensors(
        {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()},
        path / WEIGHTS_NAME,
        metadata={"format": "pt"},
    )
    return path


def peft_reference(spec: str, path: str | Path):
    """A fresh backbone for `spec` whose model PEFT's `PeftModel.from_pretrained` has wrapped with `path`."""
    from peft import PeftModel

    ref = load_backbone(spec)
    PeftModel.from_pretrained(ref.model, str(path)).eval()  # injects PEFT's layers into ref.model in place
    return ref


def compare(a, b, seed: int = 0, n: int = 3) -> dict[str, float]:
    """Max abs differences of normalised image and text embeddings of two backbones on the same random inputs."""
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randn(n, 3, a.image_size, a.image_size, generator=g)
    tokens = a.tokenize(["a photo of a cat", "the hat", "a"][:n])
    with torch.no_grad():
        image = a.encode_image(pixels, normalize=True) - b.encode_image(pixels, normalize=True)
        text = a.encode_text(tokens, normalize=True) - b.encode_text(tokens, normalize=True)
        return {"image": float(image.abs().max()), "text": float(text.abs().max())}


def compare_generative(backbone, path: str | Path, seed: int = 0) -> dict[str, float]:
    """Max abs difference between vlkit's outputs and those of a fresh transformers model that PEFT wrapped with the
    directory `path`: the language model's logits on random tokens (`vl:`), the answers' log-probabilities on random
    images (`hf:` VLMs)."""
    from peft import PeftModel

    g = torch.Generator().manual_seed(seed)
    if backbone.family == "vl":
        lm, _, src = peft_target(backbone)
        ref = PeftModel.from_pretrained(load_lm(src)[0], str(path)).eval()
        ids = torch.randint(0, int(lm.get_input_embeddings().num_embeddings), (2, 7), generator=g)
        kw = {"decoder_input_ids": ids[:, :4]} if lm.config.is_encoder_decoder else {}
        with torch.no_grad():
            return {"logits": float((lm(input_ids=ids, **kw).logits - ref(input_ids=ids, **kw).logits).abs().max())}
    other = peft_reference(backbone.spec, path)
    pixels = torch.randn(2, 3, backbone.image_size, backbone.image_size, generator=g)
    prompts, answers = ["caption:", "what is this?"], ["a photo of a cat", "a hat"]
    with torch.no_grad():
        diff = backbone.sequence_logprob(pixels, prompts, answers) - other.sequence_logprob(pixels, prompts, answers)
    return {"logprob": float(diff.abs().max())}


def export_peft(
    out: str | Path, adapter: str | Path, *, backbone: str | None = None, overwrite: bool = False, seed: int = 0
) -> dict[str, Any]:
    """`vlkit export --format peft`: write `adapter` as a PEFT directory at `out`, verified through PEFT itself."""
    output = OutputTarget(out, overwrite=overwrite, inputs=[adapter], what="PEFT adapter directory")
    output.check()
    cfg = read_adapter_config(adapter)
    spec = backbone or cfg.get("backbone")
    if not spec or not str(spec).startswith(("hf:", "vl:")):
        raise ConfigError(
            f"--format peft writes adapters of transformers backbones (hf:..., vl:...); this adapter is for {spec!r}",
            hint="open_clip / tiny adapters stay in vlkit's format (vlkit.load_adapter)",
        )
    bb = load_backbone(spec)
    rec = AdaptedModel.of(bb).load_adapter(adapter)
    with output:
        write_peft_dir(bb, rec.name, output.staging)
        if bb.kind == "generative":
            diffs = compare_generative(bb, output.staging, seed=seed)
        else:
            diffs = compare(bb, peft_reference(spec, output.staging), seed=seed)
        worst = max(diffs.values())
        if not worst <= EXPORT_TOLERANCE:
            raise ExportError(
                f"PEFT's model differs from vlkit's by {worst:.3g} (tolerance {EXPORT_TOLERANCE:g}); "
                f"nothing was written to {out}"
            )
    return {
        "format": "peft",
        "out": str(out),
        "adapter": str(adapter),
        "variant": rec.variant,
        "backbone": spec,
        "base_model": peft_target(bb)[2],
        "modules": len(rec.sites),
        "max_abs_diff": diffs,
        "tolerance": EXPORT_TOLERANCE,
        "written": [CONFIG_NAME, WEIGHTS_NAME],
    }
