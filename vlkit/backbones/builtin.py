"""Built-in backbones, registered through the same hook as third-party plugins (the world plugin adds `tiny`)."""

from __future__ import annotations

from ..hookspecs import hookimpl


def _open_clip(spec, device=None):
    from .openclip import load_open_clip

    return load_open_clip(spec, device=device)


def _hf(spec, device=None):
    from .hf import load_hf

    return load_hf(spec, device=device)


def _vl(spec, device=None):
    from .composed import load_composed

    return load_composed(spec, device=device)


@hookimpl
def register_backbones(register):
    register(
        "vl",
        _vl,
        "vl:lm=<transformers LM dir>,vision=<backbone spec>,projector=linear|mlp2x — VL-T5 style generative backbone",
    )
    register("open_clip", _open_clip, "open_clip:<model or config.json>[@<pretrained tag or .safetensors path>]")
    register(
        "hf",
        _hf,
        "hf:<hub id or local dir> — transformers CLIPModel / SiglipModel, or a local LLaVA, "
        "Idefics3/SmolVLM, BLIP or vision-encoder-decoder VLM (generative)",
    )
