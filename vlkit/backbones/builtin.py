"""Built-in backbones, registered through the same hook as third-party plugins."""
from __future__ import annotations

from ..hookspecs import hookimpl


def _tiny(spec, device=None):
    from .tiny import load_tiny

    return load_tiny(spec, device=device)


def _open_clip(spec, device=None):
    from .openclip import load_open_clip

    return load_open_clip(spec, device=device)


def _hf(spec, device=None):
    from .hf import load_hf

    return load_hf(spec, device=device)


@hookimpl
def register_backbones(register):
    register("tiny", _tiny, "built-in tiny CLIP pre-trained on the embedded photo world (tiny[@random|@path])")
    register("open_clip", _open_clip, "open_clip:<model or config.json>[@<pretrained tag or .safetensors path>]")
    register("hf", _hf, "hf:<hub id or local dir> — transformers CLIPModel / SiglipModel")
