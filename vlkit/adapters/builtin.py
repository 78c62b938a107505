"""Built-in adapter variants, registered through the same hook as third-party plugins."""
from __future__ import annotations

from ..hookspecs import hookimpl


@hookimpl
def register_adapters(register):
    from .bottleneck import BottleneckVariant
    from .fusion import FusionVariant
    from .lora import LoraVariant
    from .vpt import VptVariant

    for variant in (BottleneckVariant(), LoraVariant(), FusionVariant(), VptVariant()):
        register(variant.name, variant, variant.summary)
