"""Plugin hook specifications. Every hook takes a `register` callback: register(name, obj, summary="", **meta)."""

from __future__ import annotations

import pluggy

hookspec = pluggy.HookspecMarker("vlkit")
hookimpl = pluggy.HookimplMarker("vlkit")


@hookspec
def register_backbones(register):
    """Register backbone factories: register("prefix", factory) where factory(spec: str, **kw) -> Backbone.

    A factory named "open_clip" handles specs "open_clip:<model>[@<tag or path>]"; a name without a colon
    (like "tiny") handles exactly that spec.
    """


@hookspec
def register_adapters(register):
    """Register adapter variants: register("lora", LoraVariant()) (a vlkit.adapters.base.AdapterVariant)."""


@hookspec
def register_tasks(register):
    """Register tasks (loss, metrics, head): register("classification", ClassificationTask)."""


@hookspec
def register_datasets(register):
    """Register dataset kinds: register("jsonl", loader) where loader(source: str, **options) -> datasets.Dataset."""


@hookspec
def register_probes(register):
    """Register diagnostic probes: register("winoground", probe)."""


@hookspec
def register_exporters(register):
    """Register export targets: register("onnx", exporter)."""


@hookspec
def register_methods(register):
    """Register training methods: register("adapter", AdapterMethod()) (a vlkit.train.methods.TrainingMethod)."""


@hookspec
def register_commands(cli):
    """Add commands to the vlkit CLI: `cli` is the root typer.Typer app."""
