"""vlkit-ia3: (IA)^3 for vlkit as a third-party plugin (entry-point group "vlkit", name "ia3").

It registers, through vlkit's hooks only (`vlkit.hookspecs`), with no core module naming any of them:

- adapter `ia3` (vlkit_ia3.variant): (IA)^3 (Liu et al., 2022, "Few-Shot Parameter-Efficient Fine-Tuning is
  Better and Cheaper than In-Context Learning"): l_k and l_v rescale the attention keys and values, l_ff the
  MLP's hidden activation; the vectors start at ones, so the injected model equals the frozen one;
- adapter `ia3-weight` (vlkit_ia3.weight): (IA)^3 on the weights, each output row of a projection rescaled
  to a learned magnitude over its base norm, initialised from the base weights `create_layer` receives;
- task `caption-match` (vlkit_ia3.task): binary image-caption matching, a two-number head over the cosine;
- probe `word-order` (vlkit_ia3.probe): the caption against its words reversed / shuffled.

Torch and the implementations load only when vlkit builds its registries (the hooks import lazily).
"""
from __future__ import annotations

from vlkit.hookspecs import hookimpl

__version__ = "0.2.0"

SUMMARY = "(IA)^3: learned rescaling of attention keys/values and the MLP hidden activation; mergeable"


@hookimpl
def register_adapters(register):
    from .variant import IA3Variant  # torch loads only when the registry is built
    from .weight import WeightScaleVariant

    register("ia3", IA3Variant(), SUMMARY)
    register(WeightScaleVariant.name, WeightScaleVariant(), WeightScaleVariant.summary)


@hookimpl
def register_tasks(register):
    from .task import CaptionMatchTask

    register(CaptionMatchTask.name, CaptionMatchTask, "binary image-caption matching (BCE, head over the cosine)")


@hookimpl
def register_probes(register):
    from .probe import WordOrderProbe

    probe = WordOrderProbe()
    register(probe.name, probe, summary=probe.summary)
