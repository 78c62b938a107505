"""Built-in adapter variants, registered through the same hook as third-party plugins."""
from __future__ import annotations

from ..hookspecs import hookimpl


@hookimpl
def register_adapters(register):
    from .bottleneck import BottleneckVariant
    from .cross_modal import CrossModalVariant
    from .lora import LoraVariant
    from .vpt import VptVariant

    for variant in (BottleneckVariant(), LoraVariant(), CrossModalVariant(), VptVariant()):
        register(variant.name, variant, variant.summary)
