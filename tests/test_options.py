"""Plugin options are declared as dataclasses with field help: every registered adapter variant (plugins
included), task and dataset kind that takes options documents each one; `vlkit plugins --json` and recipe
checking read those declarations (`vlkit.options`)."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field

import pytest
import torch
from cli_helpers import cli

import vlkit
from vlkit.data.coop import OPTIONS as COOP_OPTIONS
from vlkit.data.coop import CoopOptions
from vlkit.options import attribute_docs, option_specs
from vlkit.plugins import get_plugins, options_class
from vlkit.tasks.base import Task
from vlkit.tasks.classification import ClassificationTask
from vlkit.tasks.grounding import GroundingOptions, GroundingTask
from vlkit.tasks.retrieval import RetrievalOptions, RetrievalTask
from vlkit.train.recipe import load_recipe


def _entries(kind: str, declaring: bool = False):
    return [pytest.param(e, id=f"{e.plugin}:{e.name}") for e in get_plugins().registry(kind)
            if not declaring or options_class(e) is not None]


def _undocumented(cls) -> list[str]:
    return [s.name for s in option_specs(cls) if len(s.help.split()) < 3]


@pytest.mark.parametrize("entry", _entries("adapter"))
def test_every_variant_option_has_help(entry):
    cls = entry.obj.config_cls
    assert dataclasses.is_dataclass(cls)
    missing = _undocumented(cls)
    assert not missing, (f"adapter variant {entry.name} ({entry.plugin}): give {cls.__name__}'s field(s) "
                         f"{', '.join(missing)} an attribute docstring (what it does, its valid values)")
    names = [s.name for s in option_specs(cls)]
    assert names[:4] == ["towers", "layers", "targets", "exclude"]  # the shared AdapterConfig options


@pytest.mark.parametrize("entry", _entries("task"))
def test_tasks_declare_their_options_as_a_dataclass(entry):
    cls = entry.obj
    if not cls.OPTIONS:
        assert cls.options_cls is None or not dataclasses.fields(cls.options_cls)
        return
    assert cls.options_cls is not None, f"task {entry.name} ({entry.plugin}) has OPTIONS but no options_cls"
    assert cls.OPTIONS == tuple(f.name for f in dataclasses.fields(cls.options_cls))
    missing = _undocumented(cls.options_cls)
    assert not missing, f"task {entry.name}: option(s) {', '.join(missing)} have no help"


@pytest.mark.parametrize("entry", _entries("dataset", declaring=True))
def test_dataset_kind_options_have_help(entry):
    assert not _undocumented(options_class(entry))


def test_coop_kind_options_derive_from_its_dataclass():
    assert COOP_OPTIONS == ("shots", "seed", "image_dir", "name", "task")
    assert options_class(get_plugins().registry("dataset").entry("coop")) is CoopOptions
    assert {s.name: s.default for s in option_specs(CoopOptions)}["seed"] == 1


def test_declared_task_defaults_are_the_applied_ones():
    bb = vlkit.load_backbone("tiny@random")
    ret = RetrievalTask(bb, None)
    for name in ("chunk", "rerank_k", "negatives", "drop_prob"):
        assert getattr(ret, name) == getattr(RetrievalOptions, name), name
    assert ret.swap_groups == RetrievalOptions().swap_groups == []
    grd = GroundingTask(bb, None)
    assert (grd.hidden, grd.l1_weight, grd.giou_weight) == (GroundingOptions.hidden, GroundingOptions.l1_weight,
                                                            GroundingOptions.giou_weight)


def test_plugins_json_lists_declared_options(capsys):
    code, out, err = cli(["plugins", "--json"], capsys)
    assert code == 0, err
    infos = {i["name"]: i for i in json.loads(out)}
    lora = {o["name"]: o for o in infos["vlkit.adapters.builtin"]["options"]["adapter"]["lora"]}
    assert lora["rank"] == {"name": "rank", "type": "int", "default": 8, "required": False,
                            "help": "Rank r of the low-rank update B·A (>= 1)."}
    assert lora["exclude"]["default"] == [] and lora["towers"]["help"]
    peft = {o["name"]: o for o in infos["vlkit.adapters.builtin"]["options"]["adapter"]["peft"]}
    assert peft["config"]["default"]["peft_type"] == "LORA"
    tasks = infos["vlkit.tasks.builtin"]["options"]["task"]
    assert [o["name"] for o in tasks["classification"]] == list(ClassificationTask.OPTIONS)
    assert {"prompt", "head", "class_names"} <= set(ClassificationTask.OPTIONS)
    assert "pairs" not in tasks  # no options declared
    assert [o["name"] for o in infos["vlkit.data.builtin"]["options"]["dataset"]["coop"]] == list(COOP_OPTIONS)
    ia3 = infos["ia3"]["options"]  # the outside example plugin
    assert {"ia3", "ia3-weight"} <= set(ia3["adapter"]) and "caption-match" in ia3["task"]
    assert all(o["help"] for o in ia3["task"]["caption-match"])
    assert infos["vlkit.backbones.builtin"]["options"] == {}


def test_kind_override_keeps_the_options_the_dataclass_declares():
    notes: list[str] = []
    cfg = load_recipe("recipes/quickstart.yaml", ["data.train.kind=coop", "data.train.source=DATA/pets"],
                      notes=notes)
    assert dict(cfg.data.train) == {"kind": "coop", "seed": 0, "source": "DATA/pets"}  # seed is a coop option
    assert notes == ["data.train.kind=coop: dropped data.train option(s) domain, n, task, which dataset kind "
                     "'coop' does not take"]


def test_task_override_keeps_the_options_a_plugin_task_declares():
    notes: list[str] = []
    cfg = load_recipe("recipes/quickstart.yaml", ["task.name=caption-match", "task.options.scale=5"], notes=notes)
    assert dict(cfg.task.options) == {"scale": 5}  # the vlkit-ia3 task's options come from its options_cls
    assert notes == ["task.name=caption-match: dropped task.options option(s) head, which task 'caption-match' "
                     "does not take"]


# --- option_specs --------------------------------------------------------------------------------------------------

@dataclass
class _Base:
    width: int = 4
    """Width of the thing."""
    mode: str = "a"
    """Base help of mode."""
    _private: int = 0
    """Not an option."""


@dataclass
class _Child(_Base):
    mode: str = "b"
    """Child help of mode."""
    names: list[str] = field(default_factory=list, metadata={"help": "Names, from metadata."})
    size: float = field(default=1.5, metadata={"help": "Metadata wins."})
    """Docstring loses."""
    undocumented: bool = False
    needed: int = field(default=0)


def test_option_specs_reads_docstrings_of_a_subclass_and_its_base():
    specs = {s.name: s for s in option_specs(_Child)}
    assert list(specs) == ["width", "mode", "names", "size", "undocumented", "needed"]
    assert specs["width"].help == "Width of the thing." and specs["width"].type == "int"
    assert specs["mode"].help == "Child help of mode." and specs["mode"].default == "b"
    assert specs["names"].help == "Names, from metadata." and specs["names"].default == []
    assert specs["size"].help == "Metadata wins."
    assert specs["undocumented"].help == "" and not specs["undocumented"].required
    assert option_specs(_Base)[1].help == "Base help of mode."
    assert attribute_docs(_Child)["_private"] == "Not an option."
    assert specs["names"].to_dict()["type"] == "list[str]"


def test_option_specs_marks_required_fields_and_refuses_non_dataclasses():
    @dataclass
    class Needs:
        path: str
        """Where it is."""
        k: int = 2

    path, k = option_specs(Needs)
    assert path.required and path.default is None and path.help == "Where it is."
    assert not k.required and k.default == 2
    with pytest.raises(TypeError, match="not a dataclass"):
        option_specs(int)


# --- Task.options_cls ----------------------------------------------------------------------------------------------

class _Stub(Task):
    def prepare(self, backbone, ds):
        return {}

    def loss(self, backbone, batch):
        return torch.zeros(())

    def evaluate(self, backbone, data, batch_size=256):
        return {}


def test_task_options_derive_from_options_cls():
    @dataclass
    class Opts:
        temperature: float = 1.0
        """Softmax temperature (> 0)."""
        bias: bool = False
        """Learn a bias."""

    class Temp(_Stub):
        options_cls = Opts

    class Sub(Temp):  # inherits both
        pass

    assert Temp.OPTIONS == ("temperature", "bias") and Sub.OPTIONS == Temp.OPTIONS
    assert Task.OPTIONS == () and Task.options_cls is None

    class Legacy(_Stub):  # a task that names its options without a dataclass keeps working
        OPTIONS = ("x",)

    assert Legacy.OPTIONS == ("x",) and Legacy.options_cls is None


def test_task_options_cls_must_be_a_dataclass_matching_options():
    @dataclass
    class Opts:
        a: int = 1
        """A."""

    with pytest.raises(TypeError, match="must be a dataclass"):
        type("Bad", (_Stub,), {"options_cls": dict})
    with pytest.raises(TypeError, match="differs from its options_cls"):
        type("Both", (_Stub,), {"options_cls": Opts, "OPTIONS": ("a", "b")})
    assert type("Same", (_Stub,), {"options_cls": Opts, "OPTIONS": ("a",)}).OPTIONS == ("a",)
