"""Built-in adapter variants, registered through the same hook as third-party plugins."""
from __future__ import annotations

from ..hookspecs import hookimpl


@hookimpl
def register_adapters(register):
    from .bottleneck import BottleneckVariant
    from .lora import LoraVariant

    for variant in (BottleneckVariant(), LoraVariant()):
        register(variant.name, variant, variant.summary)
