"""Built-in adapter variants, registered through the same hook as third-party plugins."""

from __future__ import annotations

from ..hookspecs import hookimpl


@hookimpl
def register_adapters(register):
    from .bottleneck import BottleneckVariant
    from .clip_adapter import ClipAdapterVariant
    from .coop import CoopVariant
    from .cross_modal import CrossModalVariant
    from .dora import DoraVariant
    from .lora import LoraVariant
    from .maple import MapleVariant
    from .peft_bridge import PeftVariant
    from .prompt import PromptVariant
    from .tip_adapter import TipAdapterFVariant, TipAdapterVariant
    from .vera import VeraVariant
    from .vpt import VptVariant

    for variant in (
        BottleneckVariant(),
        LoraVariant(),
        CrossModalVariant(),
        VptVariant(),
        CoopVariant(),
        MapleVariant(),
        ClipAdapterVariant(),
        TipAdapterVariant(),
        TipAdapterFVariant(),
        DoraVariant(),
        VeraVariant(),
        PromptVariant(),
    ):
        register(variant.name, variant, variant.summary)
    register(PeftVariant.name, PeftVariant(), PeftVariant.summary)  # the PEFT bridge (vlkit.adapters.peft_bridge)
