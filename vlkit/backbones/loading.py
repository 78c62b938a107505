"""`load_backbone(spec)`: find the registered factory for a spec and build the backbone."""

from __future__ import annotations

from ..errors import ConfigError
from ..plugins import registry


def factory_name(spec: str) -> str:
    """`open_clip:ViT-B-32@tag` -> `open_clip`; `tiny@random` -> `tiny`; `hf:/dir` -> `hf`."""
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError("backbone spec is empty", hint="e.g. tiny, open_clip:ViT-B-32@laion2b_s34b_b79k, hf:/path")
    head = spec.split(":", 1)[0] if ":" in spec.split("@", 1)[0] else spec.split("@", 1)[0]
    return head


def load_backbone(spec: str = "tiny", device: str | None = None):
    """Build the backbone named by `spec` with the factory its plugin registered (frozen, eval mode)."""
    factory = registry("backbone").get(factory_name(spec))
    backbone = factory(spec, device=device)
    for p in backbone.parameters():
        p.requires_grad_(False)
    backbone.eval()  # the wrapper too, not only the model inside it
    return backbone
