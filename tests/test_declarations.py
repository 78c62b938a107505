"""What plugins declare is what the core reads: task fields, routing text, prediction, training methods, and
recipe overrides that switch a plugin drop the options the new one does not take."""
from __future__ import annotations

import datasets
import pytest
import torch

import vlkit
from vlkit.data import required_fields
from vlkit.errors import ConfigError
from vlkit.hookspecs import hookimpl
from vlkit.plugins import get_plugins, registry, reset_plugins
from vlkit.tasks.base import Task
from vlkit.train.methods import TrainingMethod
from vlkit.train.recipe import load_recipe


class EchoTask(Task):
    """A plugin task: image-caption pairs under other column names."""

    name = "echo"
    metric = "loss"
    required = ("picture", "words")
    text_column = "words"
    OPTIONS = ("scale",)

    def prepare(self, backbone, ds):
        return {}

    def loss(self, backbone, batch):
        return torch.zeros(())

    def evaluate(self, backbone, data, batch_size=256):
        return {"loss": 0.0}


class HeadOnly(TrainingMethod):
    name = "head_only"
    summary = "test method"


class _Plugin:
    @hookimpl
    def register_tasks(self, register):
        register("echo", EchoTask, "test task")

    @hookimpl
    def register_methods(self, register):
        register("head_only", HeadOnly(), "test method")


@pytest.fixture
def plugin():
    reset_plugins()
    get_plugins().register_plugin(_Plugin(), "test-declarations")
    yield
    reset_plugins()


def test_required_fields_come_from_the_registered_task(plugin):
    assert required_fields("pairs") == ("image_0", "image_1", "caption_0", "caption_1")
    assert required_fields("winoground") == ("image_0", "image_1", "caption_0", "caption_1")
    assert required_fields("echo") == ("picture", "words")
    with pytest.raises(ConfigError, match="unknown task 'nope'.*echo"):
        required_fields("nope")


def test_data_validation_reads_the_declaration(plugin, tmp_path):
    from vlkit.data.api import validate

    ds = datasets.Dataset.from_dict({"picture": ["x"], "other": ["y"]})
    with pytest.raises(Exception, match="words"):
        validate(ds, "echo")


def test_router_text_from_the_task_declaration(plugin):
    from vlkit.compose.router import example_texts as _texts

    ds = datasets.Dataset.from_dict({"words": ["a red square", "a blue circle"], "caption": ["x", "y"]})
    assert _texts(ds, {"name": "echo"}) == ["a red square", "a blue circle"]
    labelled = datasets.Dataset.from_dict({"label": [1, 0]}).cast_column(
        "label", datasets.ClassLabel(names=["cat", "dog"]))
    meta = {"name": "classification", "options": {"prompt": "a photo of a {}", "class_names": ["cat", "dog"]}}
    assert _texts(labelled, meta) == ["a photo of a dog", "a photo of a cat"]


def test_default_answer_is_the_image_text_score():
    bb = vlkit.load_backbone("tiny@random")
    task = registry("task").get("retrieval")(bb, None)
    pixels = torch.zeros(1, 3, bb.image_size, bb.image_size)
    tokens = bb.tokenize(["a red square"])
    out = task.answer(bb, pixels, tokens)
    with torch.no_grad():
        ref = float(bb.logit_scale) * float((bb.encode_image(pixels, normalize=True)
                                             * bb.encode_text(tokens, normalize=True)).sum())
    assert out == {"task": "retrieval", "score": round(ref, 4)}


def test_methods_are_a_registry(plugin):
    assert set(registry("method").names()) >= {"adapter", "full", "linear", "zeroshot", "fuse", "head_only"}
    cfg = load_recipe("recipes/quickstart.yaml", ["method=head_only"])
    assert cfg.method == "head_only"
    with pytest.raises(ConfigError, match="unknown method 'nope'; known: .*head_only"):
        load_recipe("recipes/quickstart.yaml", ["method=nope"])


def test_variant_override_drops_foreign_options_with_one_note():
    notes: list[str] = []
    cfg = load_recipe("recipes/quickstart.yaml", ["adapter.variant=lora", "adapter.rank=4"], notes=notes)
    assert dict(cfg.adapter) == {"variant": "lora", "towers": "both", "rank": 4}
    assert notes == ["adapter.variant=lora: dropped adapter option(s) reduction, which adapter variant 'lora' "
                     "does not take"]


def test_task_and_kind_overrides_drop_foreign_options():
    notes: list[str] = []
    cfg = load_recipe("recipes/quickstart.yaml", ["task.name=retrieval", "data.train.kind=manifest",
                                                  "data.train.path=recipes/quickstart.yaml"], notes=notes)
    assert dict(cfg.task.options) == {}
    assert dict(cfg.data.train) == {"kind": "manifest", "path": "recipes/quickstart.yaml"}
    assert len(notes) == 2 and "head" in notes[0] and "domain, n, seed, task" in notes[1]


def test_null_and_tilde_remove_keys_of_free_mappings():
    cfg = load_recipe("recipes/quickstart.yaml", ["task.options.head=null", "~adapter.towers",
                                                  "optim.head_lr=null"])
    assert "head" not in cfg.task.options and "towers" not in cfg.adapter
    assert cfg.optim.head_lr is None


def test_train_cli_prints_the_note(tmp_path, capsys):
    from cli_helpers import cli

    code, _, err = cli(["train", "recipes/quickstart.yaml", "adapter.variant=lora", "optim.steps=1",
                        "eval.every_steps=0", "data.train.n=16", "data.eval.n=8", "checkpoint.every_steps=0",
                        "-o", str(tmp_path / "run"), "--no-progress"], capsys)
    assert code == 0, err
    assert "note: adapter.variant=lora: dropped adapter option(s) reduction" in " ".join(err.split())
