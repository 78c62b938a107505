"""vlkit-ia3: the (IA)^3 adapter variant as a third-party vlkit plugin (entry-point group "vlkit", name "ia3").

(IA)^3 (Liu et al., 2022, "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context
Learning") learns three vectors per transformer block: l_k and l_v rescale the attention keys and values,
l_ff rescales the MLP's hidden activation. The vectors start at ones, so the injected model equals the frozen one.
"""
from __future__ import annotations

from vlkit.hookspecs import hookimpl

__version__ = "0.1.0"

SUMMARY = "(IA)^3: learned rescaling of attention keys/values and the MLP hidden activation; mergeable"


@hookimpl
def register_adapters(register):
    from .variant import IA3Variant  # torch loads only when the registry is built

    register("ia3", IA3Variant(), SUMMARY)
