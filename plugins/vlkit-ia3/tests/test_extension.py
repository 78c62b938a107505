"""The plugin's extension of vlkit beyond the `ia3` variant — a variant that needs its base weights
(`ia3-weight`), a task (`caption-match`) and a probe (`word-order`) — used with no core edits, through the CLI as
a user would: train (single- and multi-task), merge, route, `compose run`, export (ONNX verified) and probe.

The end-to-end tests share one module-scoped set of runs on the pre-trained `tiny` backbone (a few steps each);
the unit tests use `tiny@random`.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import vlkit
from vlkit.adapters import linear_weights
from vlkit.adapters.inject import adapter_layers, merge_adapter, unmerge_adapter
from vlkit.errors import ConfigError
from vlkit.plugins import reset_plugins
from vlkit.adapters.model import AdaptedModel

SPEC = "tiny@random"
OPTIM = "{lr: 1.0e-2, head_lr: 5.0e-2, steps: STEPS, batch_size: 16, warmup_steps: 0, schedule: constant}"
LOGGING = "{tensorboard: false, plot: false}"


def _cli(*args: str, cwd=None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("VLKIT_PLUGINS", None)
    return subprocess.run([sys.executable, "-m", "vlkit", *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=300)


def _ok(*args: str, cwd=None) -> dict | None:
    """Run a CLI command that must succeed; its --json output parsed (None without --json)."""
    res = _cli(*args, cwd=cwd)
    assert res.returncode == 0, f"vlkit {' '.join(args)} failed:\n{res.stderr[-3000:]}"
    return json.loads(res.stdout) if "--json" in args else None


@pytest.fixture(autouse=True)
def _all_plugins(monkeypatch):
    monkeypatch.delenv("VLKIT_PLUGINS", raising=False)
    reset_plugins()
    yield
    reset_plugins()


def _single_recipe(path: Path, name: str, train: str, evaluate: str, steps: int = 10) -> Path:
    path.write_text(f"""name: {name}
backbone: tiny
method: adapter
adapter: {{variant: ia3-weight, modules: qv}}
task: {{name: caption-match}}
data:
  train: {train}
  eval: {evaluate}
optim: {OPTIM.replace("STEPS", str(steps))}
logging: {LOGGING}
seed: 0
""")
    return path


def _write_manifest(root: Path, domain: str, n: int, seed: int) -> Path:
    """A local JSONL manifest (image files + captions) written from world retrieval data."""
    from vlkit.data import load_data

    ds = load_data({"kind": "world", "domain": domain, "task": "retrieval", "n": n, "seed": seed})
    (root / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for i, row in enumerate(ds):
        row["image"].save(root / "images" / f"{i}.png")
        lines.append(json.dumps({"image": f"images/{i}.png", "caption": row["caption"]}))
    path = root / "captions.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two single-task caption-match adapters trained with `vlkit train`: `photo` on world data, `sketch` on a
    local manifest; an input image and its caption for `compose run`."""
    root = tmp_path_factory.mktemp("ia3-ext")
    manifest = _write_manifest(root / "sketch-data", "sketch", 64, 0)
    eval_manifest = _write_manifest(root / "sketch-eval", "sketch", 32, 1000)
    photo = _single_recipe(root / "photo.yaml", "cm-photo",
                           "{kind: world, domain: photo, task: retrieval, n: 64, seed: 0}",
                           "{kind: world, domain: photo, task: retrieval, n: 32, seed: 1000}")
    sketch = _single_recipe(root / "sketch.yaml", "cm-sketch", f"{{kind: manifest, path: {manifest}}}",
                            f"{{kind: manifest, path: {eval_manifest}}}")
    out = {"root": root, "photo": root / "photo", "sketch": root / "sketch", "manifest": manifest}
    out["photo_result"] = _ok("train", str(photo), "-o", str(out["photo"]), "--json", "--no-progress")
    out["sketch_result"] = _ok("train", str(sketch), "-o", str(out["sketch"]), "--json", "--no-progress")
    first = json.loads(manifest.read_text().splitlines()[0])
    out["image"], out["caption"] = manifest.parent / first["image"], first["caption"]
    return out


def _layers(bb, name="default"):
    return adapter_layers(bb, name)


def _embed(bb, pixels, tokens):
    with torch.no_grad():
        return bb.encode_image(pixels, normalize=True), bb.encode_text(tokens, normalize=True)


def _inputs(bb):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(2, 3, bb.image_size, bb.image_size, generator=g),
            bb.tokenize(["a photo of a cat", "a red square"]))


# --- ia3-weight: the layer contract, from the base weights ------------------------------------------------

def test_weight_variant_config_and_sites():
    from vlkit_ia3.weight import MODULE_ROLES, WeightScaleVariant

    var = WeightScaleVariant()
    assert var.make_config().modules == "qv"
    with pytest.raises(ConfigError, match="modules"):
        var.make_config(modules="kv")
    for modules, roles in MODULE_ROLES.items():
        bb = vlkit.load_backbone(SPEC)
        record = vlkit.inject(bb, "ia3-weight", modules=modules)
        assert {s.role for s in record.sites} == set(roles)
        assert len(record.sites) == len(roles) * len(bb.all_blocks())


def test_weight_identity_at_init_with_magnitudes_from_the_base():
    """m starts at the base weight's row norms, read from the `base` create_layer receives (a LinearView of
    nn.MultiheadAttention's q / v rows in tiny), so the injected model is exactly the frozen one."""
    from vlkit.backbones.base import resolve_module

    torch.manual_seed(0)
    bb = vlkit.load_backbone(SPEC)
    pixels, tokens = _inputs(bb)
    frozen = _embed(bb, pixels, tokens)
    record = vlkit.inject(bb, "ia3-weight", modules="all")
    layers = _layers(bb)
    for site in record.sites:
        weight, _ = linear_weights(resolve_module(bb.model, site.host_path), site.role)
        assert torch.equal(layers[site.path].magnitude, weight.detach().norm(dim=1)), site.path
        x = torch.randn(3, weight.shape[1])
        y = F.linear(x, weight.detach())
        assert torch.equal(layers[site.path](x, y, weight.detach(), None), y)  # each layer: exactly y at init
    adapted = _embed(bb, pixels, tokens)
    for a, f in zip(adapted, frozen):  # the hosts compute attention projections one by one: rounding only
        torch.testing.assert_close(a, f, atol=1e-6, rtol=0)


def _perturb(bb, name="default", seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in _layers(bb, name).values():
            layer.magnitude.mul_(1 + 0.2 * torch.randn(layer.magnitude.shape, generator=g))


def test_weight_merge_and_unmerge_restore_bit_exactly():
    bb = vlkit.load_backbone(SPEC)
    pixels, tokens = _inputs(bb)
    vlkit.inject(bb, "ia3-weight", modules="all")
    _perturb(bb)
    tuned = _embed(bb, pixels, tokens)
    AdaptedModel.of(bb).set_adapter()
    assert not torch.allclose(_embed(bb, pixels, tokens)[0], tuned[0], atol=1e-4)
    AdaptedModel.of(bb).set_adapter("default")
    base = {n: p.detach().clone() for n, p in bb.base_parameters().items()}
    merge_adapter(bb, "default")
    changed = [n for n, p in bb.base_parameters().items() if not torch.equal(p, base[n])]
    assert changed and not any(n.endswith("bias") for n in changed)  # only the weights fold; biases stay
    merged = _embed(bb, pixels, tokens)
    for a, t in zip(merged, tuned):
        torch.testing.assert_close(a, t, atol=1e-5, rtol=0)
    unmerge_adapter(bb, "default")
    for n, p in bb.base_parameters().items():
        assert torch.equal(p, base[n]), f"{n} not restored bit-exactly"
    again = _embed(bb, pixels, tokens)
    for a, t in zip(again, tuned):
        assert torch.equal(a, t)


def test_weight_layer_math_matches_merged_weight():
    from vlkit_ia3.weight import WeightScaleLayer, WeightScaleVariant

    torch.manual_seed(0)
    lin = torch.nn.Linear(5, 6)
    x = torch.randn(3, 5)
    y = lin(x)
    layer = WeightScaleLayer(lin)
    assert torch.equal(layer(x, y, lin.weight, lin.bias), y)
    with torch.no_grad():
        layer.magnitude.copy_(torch.rand(6) + 0.5)
    w, b = WeightScaleVariant().merged_weight(layer, lin.weight.detach().clone(), lin.bias.detach().clone())
    torch.testing.assert_close(w.norm(dim=1), layer.magnitude.detach())  # rows rescaled to the magnitudes
    torch.testing.assert_close(layer(x, y, lin.weight, lin.bias), F.linear(x, w, b))
    assert torch.equal(b, lin.bias)


def test_gradients_only_in_adapter_parameters_under_the_plugin_task(tmp_path):
    """A caption-match loss on a manifest batch trains the ia3-weight magnitudes and the task head, nothing else."""
    from vlkit.data import load_data
    from vlkit.data.pipeline import materialize
    from vlkit_ia3.task import CaptionMatchTask

    torch.manual_seed(0)
    bb = vlkit.load_backbone(SPEC)
    vlkit.inject(bb, "ia3-weight")
    ds = load_data({"kind": "manifest", "path": str(_write_manifest(tmp_path, "photo", 6, 3))}, task="caption-match")
    task = CaptionMatchTask(bb, ds)
    loss = task.loss(bb, materialize(task.prepare(bb, ds)))
    loss.backward()
    trained = [n for n, p in bb.model.named_parameters() if p.grad is not None]
    assert trained and all(".adapters." in n and n.endswith(".magnitude") for n in trained)
    for n, p in bb.model.named_parameters():
        assert p.requires_grad == (".adapters." in n), n
    assert all(p.grad is not None for p in task.head.parameters())


# --- caption-match: the task as the data layer, compose run and a local manifest see it ---------------------

def test_caption_match_declaration_reaches_the_data_layer(tmp_path):
    from vlkit.data import load_data
    from vlkit.data.api import required_fields

    assert required_fields("caption-match") == ("image", "caption")
    assert required_fields("word-order") == ("image", "caption")
    bad = tmp_path / "bad.jsonl"
    (tmp_path / "a.png").write_bytes(b"")
    bad.write_text(json.dumps({"image": "a.png", "label": 1}) + "\n")
    with pytest.raises(vlkit.errors.DataError, match="caption"):
        load_data({"kind": "manifest", "path": str(bad)}, task="caption-match")


def test_caption_match_on_a_manifest_evaluate_and_answer(tmp_path):
    from vlkit.data import load_data
    from vlkit_ia3.task import CaptionMatchTask

    bb = vlkit.load_backbone(SPEC)
    ds = load_data(str(_write_manifest(tmp_path, "photo", 8, 1)), task="caption-match")
    task = CaptionMatchTask(bb, ds, bias=-1.0)
    data = task.prepare(bb, ds)
    assert set(data) == {"pixels", "tokens", "caption_ids"}
    metrics = task.evaluate(bb, data, batch_size=4)
    assert set(metrics) == {"accuracy", "matched_accuracy", "mismatched_accuracy"}
    assert 0.0 <= metrics["accuracy"] <= 100.0
    assert metrics["accuracy"] == pytest.approx((metrics["matched_accuracy"] + metrics["mismatched_accuracy"]) / 2)
    pixels = bb.preprocess_batch([ds[0]["image"]])
    ans = task.answer(bb, pixels, bb.tokenize([ds[0]["caption"]]))
    assert ans["task"] == "caption-match" and 0.0 <= ans["p_match"] <= 1.0 and ans["match"] == (ans["p_match"] > 0.5)
    assert "p_match" not in task.answer(bb, pixels, None)
    # rebuilt from its metadata, as `compose run` does
    again = CaptionMatchTask(bb, None, **task.metadata()["options"])
    again.load_head_state(task.head_state())
    assert again.answer(bb, pixels, bb.tokenize([ds[0]["caption"]]))["p_match"] == ans["p_match"]
    with pytest.raises(ConfigError, match="unknown option"):
        CaptionMatchTask(bb, None, threshold=0.5)


# --- word-order: perturbations and the probe on local data ------------------------------------------------------

def test_word_order_perturbations_are_seeded_and_differ():
    from vlkit_ia3.probe import perturbations

    p = perturbations("a red circle left of a blue square", seed=3)
    assert set(p) == {"reverse", "shuffle"}
    assert p["reverse"] == "square blue a of left circle red a"
    assert sorted(p["shuffle"].split()) == sorted("a red circle left of a blue square".split())
    assert p["shuffle"] not in ("a red circle left of a blue square", p["reverse"])
    assert perturbations("a red circle left of a blue square", seed=3) == p
    assert perturbations("circle", seed=0) == {}
    assert set(perturbations("red circle", seed=0)) == {"reverse"}  # its only other order is the reverse


def test_word_order_probe_on_a_manifest(tmp_path):
    from vlkit.probe.base import get_probe
    from vlkit.probe.systems import resolve_systems

    manifest = _write_manifest(tmp_path, "photo", 10, 2)
    bb = vlkit.load_backbone(SPEC)
    probe = get_probe("word-order")
    result = probe.run(bb, resolve_systems(bb, None), data=str(manifest), n=6, n_boot=50, data_seed=1)
    assert result["probe"] == "word-order" and result["images"] == 6
    assert result["metrics"] == ["accuracy", "micro_accuracy"] and result["primary"] == "accuracy"
    (system,) = result["systems"]
    assert set(system["breakdowns"]["category"]) <= {"reverse", "shuffle"}
    assert result["n"] == len(result["per_example"]["ids"])
    s = system["scores"]["accuracy"]
    assert s["low"] <= s["value"] <= s["high"]


# --- end to end, through the CLI ----------------------------------------------------------------------------

def test_plugin_objects_are_listed():
    probes = _ok("probe", "--list", "--json")
    assert {"name": "word-order", "plugin": "ia3"}.items() <= next(p for p in probes if p["name"] == "word-order").items()


def test_train_single_task_on_world_data_and_on_a_manifest(runs):
    for key, n_eval in (("photo", 32), ("sketch", 32)):
        out = runs[key]
        result = runs[f"{key}_result"]
        assert result["task"] == "caption-match" and result["primary_metric"] == "accuracy"
        assert result["parameters"]["head"] == 2 and result["parameters"]["adapter"] > 0
        cfg = json.loads((out / "adapter_config.json").read_text())
        assert cfg["variant"] == "ia3-weight" and cfg["variant_plugin"] == "ia3"
        assert json.loads((out / "task.json").read_text())["name"] == "caption-match"
        assert (out / "head.safetensors").is_file()
        assert 0.0 <= result["metrics"]["accuracy"] <= 100.0
    # the pre-trained tiny backbone with the learned threshold tells matched from mismatched captions
    assert runs["photo_result"]["metrics"]["accuracy"] > 75.0


def test_train_multi_task_with_a_builtin_task_then_compose_run(runs):
    root = runs["root"]
    recipe = root / "mt.yaml"
    recipe.write_text(f"""name: mt
backbone: tiny
method: adapter
adapter: {{variant: ia3-weight, modules: qv}}
sharing: shared     # the variant's `shareable` declaration: one magnitude vector per site for both tasks
tasks:
  - name: caption-match
    adapter: match
    data:
      train: {{kind: world, domain: photo, task: retrieval, n: 48, seed: 0}}
      eval: {{kind: world, domain: photo, task: retrieval, n: 24, seed: 1000}}
  - name: classification
    adapter: cls
    data:
      train: {{kind: world, domain: satellite, task: classification, n: 48, seed: 0}}
      eval: {{kind: world, domain: satellite, task: classification, n: 24, seed: 1000}}
optim: {OPTIM.replace("STEPS", "6")}
logging: {LOGGING}
seed: 0
""")
    out = root / "mt"
    result = _ok("train", str(recipe), "-o", str(out), "--json", "--no-progress")
    assert result["sharing"] == "shared" and result["tasks"] == ["match", "cls"]
    assert result["per_task"]["match"]["task"] == "caption-match"
    assert result["per_task"]["cls"]["task"] == "classification"
    comp = json.loads((out / "composition.json").read_text())
    assert [(a["name"], a["variant"], a["task"]) for a in comp["adapters"]] == [
        ("match", "ia3-weight", "caption-match"), ("cls", "ia3-weight", "classification")]
    # shared: one copy of the magnitudes for both tasks
    assert comp["shared_parameters"]["numel"] == result["parameters"]["adapter"]
    ran = _ok("compose", "run", str(out), "--task", "caption-match", "--image", str(runs["image"]),
              "--text", runs["caption"], "--json")
    (pred,) = ran["predictions"]
    assert pred["adapter"] == "match" and pred["task"] == "caption-match" and 0.0 <= pred["p_match"] <= 1.0


def test_compose_merge_of_two_ia3_weight_adapters_loads(runs):
    from vlkit.adapters.files import read_adapter_weights

    out = runs["root"] / "merged"
    res = _ok("compose", f"{runs['photo']},{runs['sketch']}", "--mode", "merge", "-o", str(out), "--json")
    assert res["variant"] == "ia3-weight" and res["method"] == "linear"
    a, b, m = (read_adapter_weights(p) for p in (runs["photo"], runs["sketch"], out))
    assert set(m) == set(a) and all(k.endswith(".magnitude") for k in m)
    for k in m:  # linear: the average of the magnitudes
        torch.testing.assert_close(m[k], (a[k] + b[k]) / 2)
    bb = vlkit.load_backbone("tiny")
    pixels, tokens = _inputs(bb)
    frozen = _embed(bb, pixels, tokens)
    name = vlkit.load_adapter(bb, out)
    assert AdaptedModel.of(bb).records[AdaptedModel.of(bb).state.active[0]].variant == "ia3-weight", name
    merged = _embed(bb, pixels, tokens)
    assert not torch.allclose(merged[0], frozen[0], atol=1e-6)


def test_compose_route_then_run_with_auto_routing(runs):
    out = runs["root"] / "routed"
    res = _ok("compose", f"{runs['photo']},{runs['sketch']}", "--mode", "route", "-o", str(out),
              "--router-steps", "50", "--per-adapter", "32", "--json")
    assert res["adapters"] == ["cm-photo", "cm-sketch"]
    assert 0.0 <= res["routing"]["heldout_accuracy"] <= 100.0
    ran = _ok("compose", "run", str(out), "--route", "auto", "--image", str(runs["image"]),
              "--text", runs["caption"], "--json")
    (pred,) = ran["predictions"]
    assert ran["route"] == "auto" and pred["adapter"] in ("cm-photo", "cm-sketch")
    assert pred["task"] == "caption-match" and 0.0 <= pred["p_match"] <= 1.0
    assert pred["answer"].startswith(("match", "no match"))


def test_export_with_the_plugin_variant_is_verified(runs):
    out = runs["root"] / "export"
    summary = _ok("export", "--adapter", str(runs["photo"]), "-o", str(out), "--eval-n", "32", "--json")
    assert summary["passed"] is True
    assert summary["merged"] == ["cm-photo"]  # ia3-weight folded into the weights by its merged_weight
    assert {"image_encoder.onnx", "text_encoder.onnx"} <= set(summary["written"])
    assert all(c["passed"] for c in summary["checks"] if c["required"])
    assert (out / "image_encoder.onnx").is_file() and (out / "export.json").is_file()


def test_probe_word_order_on_the_cli(runs):
    result = _ok("probe", "word-order", "--adapters", str(runs["photo"]), "-n", "12", "--bootstrap", "50",
                 "--json", "--no-progress")
    assert result["probe"] == "word-order" and result["dataset"] == "word-order:world-photo"
    assert [s["label"] for s in result["systems"]] == ["backbone", str(runs["photo"])]
    backbone, adapted = result["systems"]
    assert backbone["diff"] is None and set(adapted["diff"]) == {"accuracy", "micro_accuracy"}
    assert set(adapted["breakdowns"]["category"]) == {"reverse", "shuffle"}
    assert result["chance"] == {"accuracy": 50.0, "micro_accuracy": 50.0}
