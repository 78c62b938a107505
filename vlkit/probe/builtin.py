"""Built-in probes, registered through the same `register_probes` hook a third-party plugin implements.

A plugin adds a probe the same way::

    from vlkit.hookspecs import hookimpl
    from vlkit.probe.base import Probe

    class MyProbe(Probe):
        name = "my-probe"
        summary = "what it measures"
        def run(self, backbone, systems, *, data=None, seed=0, n=None, n_boot=1000, level=0.95, **options):
            ...

    @hookimpl
    def register_probes(register):
        register("my-probe", MyProbe(), summary="what it measures")

and ``vlkit probe --list`` shows it, ``vlkit probe my-probe --adapters a,b`` runs it with the same options,
tables, JSON, files and plot as the built-in ones. The probe modules import numpy only; torch loads when a
probe runs.
"""

from __future__ import annotations

from ..hookspecs import hookimpl


@hookimpl
def register_probes(register):
    from .caption_pairs import CaptionPairProbe
    from .winoground import WinogroundProbe

    for probe in (WinogroundProbe(), CaptionPairProbe()):
        register(probe.name, probe, summary=probe.summary)
