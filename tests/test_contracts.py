"""Every registered implementation, built-in or from an installed plugin (the vlkit-ia3 example included), keeps
its kind's declared contract: the base class or `typing.Protocol` that names every member vlkit reads."""
from __future__ import annotations

import inspect

import pytest

import vlkit
from vlkit.adapters.base import AdapterVariant
from vlkit.backbones.base import Backbone
from vlkit.export.base import Exporter
from vlkit.plugins import get_plugins
from vlkit.probe.base import Probe
from vlkit.serve.protocols import Runner, ServeBackend
from vlkit.tasks.base import ExportableTask, Task
from vlkit.train.methods import TrainingMethod


def _entries(kind: str):
    return [pytest.param(e, id=f"{e.plugin}:{e.name}") for e in get_plugins().registry(kind)]


def _members(cls) -> set[str]:
    return {n for n in dir(cls) if not n.startswith("_")}


def test_the_example_plugin_is_among_the_implementations():
    plugins = {e.plugin for kind in ("adapter", "task") for e in get_plugins().registry(kind)}
    assert "ia3" in plugins  # the entry point name of plugins/vlkit-ia3


@pytest.mark.parametrize("entry", _entries("adapter"))
def test_variants_are_adapter_variants(entry):
    var = entry.obj
    assert isinstance(var, AdapterVariant), f"{entry.name} ({entry.plugin}) is not an AdapterVariant"
    assert var.name == entry.name
    params = inspect.signature(var.create_layer).parameters
    assert "base" in params, f"{entry.name}.create_layer must take the declared `base` argument"
    assert isinstance(var.joint, bool) and isinstance(var.shareable, dict) and isinstance(var.merge_methods, tuple)
    assert list(var.describe_state({}, {})) is not None


@pytest.mark.parametrize("entry", _entries("task"))
def test_tasks_are_task_subclasses(entry):
    cls = entry.obj
    assert inspect.isclass(cls) and issubclass(cls, Task), f"{entry.name} ({entry.plugin}) is not a Task subclass"
    assert cls.name == entry.name and cls.metric
    assert isinstance(cls.OPTIONS, tuple) and isinstance(cls.required, tuple)
    if cls.exportable:
        declared = _members(ExportableTask) - {"exportable"}
        missing = sorted(m for m in declared if not hasattr(cls, m) and m not in ("head_kind", "class_names",
                                                                                   "prompt", "prompts"))
        assert not missing, f"exportable task {entry.name} lacks {missing}"


def test_exportable_tasks_built_on_a_backbone_satisfy_the_protocol(make_backbone):
    bb = make_backbone("tiny")
    for entry in get_plugins().registry("task"):
        if entry.obj.exportable:
            task = entry.obj(bb, None, class_names=["circle", "square"], **entry.obj.zero_shot_options)
            assert isinstance(task, ExportableTask), entry.name
            assert task.head_kind == "text" and len(task.prompts) == 2


@pytest.mark.parametrize("entry", _entries("probe"))
def test_probes_are_probe_subclasses(entry):
    obj = entry.obj
    cls = obj if inspect.isclass(obj) else type(obj)
    assert issubclass(cls, Probe), f"probe {entry.name} ({entry.plugin}) is not a Probe"
    for member in ("name", "summary", "data_help", "default_data", "required", "run"):
        assert hasattr(cls, member)


@pytest.mark.parametrize("entry", _entries("exporter"))
def test_exporters_are_exporters(entry):
    obj = entry.obj
    cls = obj if inspect.isclass(obj) else type(obj)
    assert issubclass(cls, Exporter), f"exporter {entry.name} ({entry.plugin}) is not an Exporter"


@pytest.mark.parametrize("entry", _entries("method"))
def test_methods_are_training_methods(entry):
    obj = entry.obj
    cls = obj if inspect.isclass(obj) else type(obj)
    assert issubclass(cls, TrainingMethod), f"method {entry.name} ({entry.plugin}) is not a TrainingMethod"


def test_backbones_build_backbones():
    bb = vlkit.load_backbone("tiny@random")
    assert isinstance(bb, Backbone)
    assert bb.sequence_layout("vision") is None or hasattr(bb.sequence_layout("vision"), "insert_at")


def test_serve_backends_keep_the_protocol(make_backbone):
    from vlkit.serve.backends import TorchBackend
    from vlkit.serve.onnx_engine import OnnxBackend

    backend = TorchBackend("tiny@random")
    assert isinstance(backend, ServeBackend) and isinstance(backend.runner, Runner)
    for name in _members(ServeBackend):
        assert hasattr(OnnxBackend, name) or name in ("runner", "name"), f"OnnxBackend lacks {name}"
    assert OnnxBackend.name == "onnx" and backend.name == "torch"
