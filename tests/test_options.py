"""Plugin options are declared as dataclasses with field help: every registered adapter variant, task, dataset
kind, probe, exporter and training method (plugins included) that takes options documents each one, and takes
exactly the options its dataclass declares; `vlkit plugins --json` and recipe checking read those declarations
(`vlkit.options`)."""
from __future__ import annotations

import dataclasses
import inspect
import json
from dataclasses import dataclass, field

import pytest
import torch
from cli_helpers import cli

import vlkit
from vlkit.cli.probe_cmd import _accepted
from vlkit.data.coop import OPTIONS as COOP_OPTIONS
from vlkit.data.coop import CoopOptions
from vlkit.errors import ConfigError, VlkitError
from vlkit.export.onnx_export import OnnxExporter, OnnxOptions
from vlkit.options import attribute_docs, option_names, option_specs
from vlkit.plugins import get_plugins, options_class
from vlkit.probe.base import Probe, ProbeOptions, get_probe
from vlkit.tasks.base import Task
from vlkit.tasks.classification import ClassificationTask
from vlkit.tasks.grounding import GroundingOptions, GroundingTask
from vlkit.tasks.retrieval import RetrievalOptions, RetrievalTask
from vlkit.train.methods import FuseOptions, TrainingMethod
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


@pytest.mark.parametrize("kind", ["dataset", "probe", "exporter", "method"])
def test_declared_options_have_help_on_every_field(kind):
    for entry in get_plugins().registry(kind):
        cls = options_class(entry)
        if cls is not None:
            missing = _undocumented(cls)
            assert not missing, f"{kind} {entry.name} ({entry.plugin}): option(s) {', '.join(missing)} have no help"


@pytest.mark.parametrize("kind", ["dataset", "exporter"])
def test_every_builtin_kind_and_exporter_declares_its_options(kind):
    system = get_plugins()
    undeclared = [e.name for e in system.registry(kind) if e.plugin in system.builtin and options_class(e) is None]
    assert not undeclared, f"built-in {kind}(s) {', '.join(undeclared)} declare no options_cls"


def _named(fn, *skip: str) -> set[str]:
    return {p.name for p in inspect.signature(fn).parameters.values()
            if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD) and p.name not in skip}


@pytest.mark.parametrize("entry", _entries("dataset", declaring=True))
def test_dataset_kind_accepts_exactly_its_declared_options(entry):
    """Named loader parameters are declared; the other declared options pass the loader's check of its
    **options; an undeclared option is refused, naming it."""
    loader, declared = entry.obj, set(option_names(options_class(entry)))
    named = _named(loader, "source", "split")
    assert named <= declared, f"{entry.name}: loader parameter(s) {sorted(named - declared)} are not declared"
    rest = declared - named
    takes_more = any(p.kind is p.VAR_KEYWORD for p in inspect.signature(loader).parameters.values())
    assert takes_more or not rest, f"{entry.name}: declared option(s) {sorted(rest)} are not taken"
    with pytest.raises(ConfigError, match="zz_undeclared"):
        loader(None, zz_undeclared=1)
    for name in sorted(rest):  # a bare call fails later (no source), but not on the option
        try:
            loader(None, **{name: None})
        except VlkitError as exc:
            assert "unknown" not in str(exc), f"{entry.name} refuses its declared option {name}: {exc}"


def test_builtin_kinds_take_the_options_they_took_before():
    reg = get_plugins().registry("dataset")
    load = ("task", "cache_dir", "keep_in_memory", "num_proc")
    expected = {
        "hf": {*load, "config", "name", "revision", "token", "streaming", "data_files"},
        "imagefolder": {*load, "drop_labels", "drop_metadata", "filters"},
        "parquet": {*load, "columns", "filters", "batch_size"},
        "manifest": {"task"},
        "webdataset": {"task", "shards"},
        "winoground": {"task", "token", "images_dir", "n", "seed", "domain", "image_size"},
        "world": {"domain", "task", "n", "seed", "image_size"},
        "coop": set(COOP_OPTIONS),
    }
    for kind, names in expected.items():
        assert set(option_names(options_class(reg.entry(kind)))) == names, kind
    with pytest.raises(ConfigError, match="unknown option.*'parquet': seed"):
        reg.get("parquet")("x.parquet", seed=1)


def test_coop_kind_options_derive_from_its_dataclass():
    assert COOP_OPTIONS == ("shots", "seed", "image_dir", "name", "task")
    assert options_class(get_plugins().registry("dataset").entry("coop")) is CoopOptions
    assert {s.name: s.default for s in option_specs(CoopOptions)}["seed"] == 1


@pytest.mark.parametrize("entry", _entries("probe", declaring=True))
def test_probe_options_are_its_run_keywords(entry):
    probe = get_probe(entry.name)
    cls = probe.options_cls
    assert issubclass(cls, ProbeOptions)
    assert set(option_names(cls)) == _named(probe.run, "backbone", "systems", "progress")
    assert _accepted(probe) == (set(option_names(cls)), False)


def test_probe_cli_passes_only_declared_options(capsys):
    assert option_names(get_probe("caption-pairs").options_cls)[-3:] == ("data_seed", "batch_size", "image_root")
    assert Probe.options_cls is None

    class Undeclared(Probe):  # a probe without options_cls: its run's signature says what it takes
        def run(self, backbone, systems, *, data=None, seed=0, n=None, n_boot=1000, level=0.95, batch_size=8):
            return {}

    named, more = _accepted(Undeclared())
    assert "batch_size" in named and "data_seed" not in named and not more
    code, _, err = cli(["probe", "winoground", "--images", "imgs", "-n", "4"], capsys)
    assert code == 2 and "probe 'winoground' has no option 'image-root'" in err


def test_exporter_target_options_come_from_its_dataclass():
    onnx = OnnxExporter()
    assert options_class(get_plugins().registry("exporter").entry("onnx")) is OnnxOptions
    assert onnx.target_options({"threads": "2", "per_channel": "yes"}) == {"threads": 2, "per_channel": True}
    assert onnx.target_options({}) == {}
    for bad, match in (({"thread": "2"}, "unknown onnx export option 'thread'; options: threads, per_channel"),
                       ({"threads": "two"}, "onnx option threads must be an integer"),
                       ({"threads": "-1"}, "threads must be >= 0"),
                       ({"per_channel": "maybe"}, "onnx option per_channel must be true or false")):
        with pytest.raises(ConfigError, match=match):
            onnx.target_options(bad)


@pytest.mark.parametrize("entry", _entries("method"))
def test_methods_check_compose_against_their_options(entry):
    method = entry.obj
    assert isinstance(method, TrainingMethod)
    cls = options_class(entry)
    if cls is None:
        method.check_options({"anything": 1}, "r.yaml")  # declares none: not checked
        return
    method.check_options({name: None for name in option_names(cls)}, "r.yaml")
    with pytest.raises(ConfigError, match=f"r.yaml: key 'compose.zz': method '{entry.name}' does not take zz"):
        method.check_options({"zz": 1}, "r.yaml")


def test_a_recipe_with_an_undeclared_compose_key_is_refused():
    assert option_names(FuseOptions) == ("adapters", "fusion", "temperature")
    with pytest.raises(ConfigError, match="compose.tempreature.*its compose options: adapters, fusion, temperature"):
        load_recipe("recipes/fuse.yaml", ["compose.tempreature=2"])


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
    data = infos["vlkit.data.builtin"]["options"]["dataset"]
    assert set(data) >= {"hf", "imagefolder", "parquet", "manifest", "webdataset", "winoground", "coop"}
    assert [o["name"] for o in infos["vlkit.world.plugin"]["options"]["dataset"]["world"]] == [
        "domain", "task", "n", "seed", "image_size"]
    wino = {o["name"]: o for o in infos["vlkit.probe.builtin"]["options"]["probe"]["winoground"]}
    assert list(wino) == ["data", "seed", "n", "n_boot", "level", "data_seed", "batch_size"]
    assert wino["batch_size"]["default"] == 32 and wino["n_boot"]["help"]
    assert "synth-attribute-swap" in infos["vlkit.world.plugin"]["options"]["probe"]
    onnx = infos["vlkit.export.builtin"]["options"]["exporter"]["onnx"]
    assert [(o["name"], o["type"], o["default"]) for o in onnx] == [("threads", "int", 0),
                                                                    ("per_channel", "bool", False)]
    methods = infos["vlkit.train.builtin"]["options"]["method"]
    assert sorted(methods) == ["adapter", "full", "fuse", "linear"]
    assert [o["name"] for o in methods["fuse"]] == ["adapters", "fusion", "temperature"]
    assert [o["name"] for o in methods["linear"]] == ["C", "val"]


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
