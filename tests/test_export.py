"""`vlkit export` to ONNX: parity with PyTorch for every adapter variant and a merged composition, the
classifier's predictions against vlkit's, a graph loaded by a fresh process without vlkit, errors, plugins."""
from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import vlkit
from vlkit.errors import ExportError
from vlkit.export.api import export_model
from vlkit.export.base import ExportOptions, ExportResult
from cli_helpers import cli

SPEC = "tiny@random"
VARIANTS = ("bottleneck", "lora", "ia3", "fusion", "vpt", "coop", "maple", "clip-adapter", "tip-adapter",
            "tip-adapter-f", "dora", "vera")
MERGED = ("lora", "ia3", "dora", "vera")  # variants export folds into the weights


def perturb_dir(path: Path, seed: int, scale: float = 0.05) -> Path:
    """Load an adapter directory, add noise to every adapter tensor (so it is not the identity), save it back."""
    from vlkit.adapters.files import read_adapter_config
    from vlkit.adapters.inject import adapter_layers

    name = read_adapter_config(path)["name"]
    bb = vlkit.load_backbone(SPEC)
    vlkit.load_adapter(bb, path, name=name)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in adapter_layers(bb, name).values():
            for p in layer.parameters():
                p.add_(scale * torch.randn(p.shape, generator=g))
            persistent = set(layer.state_dict())
            for n, b in layer.named_buffers():  # a training-free variant's state (Tip-Adapter's cache)
                if n in persistent and b.is_floating_point():
                    b.add_(scale * torch.randn(b.shape, generator=g))
    vlkit.save_adapter(bb, path, name=name)
    return path


@pytest.fixture(scope="module")
def adapter_dirs(tmp_path_factory):
    """An adapter directory per installed built-in/plugin variant, made with `vlkit inject` and perturbed."""
    from vlkit.cli.app import main
    from vlkit.plugins import registry

    root = tmp_path_factory.mktemp("adapters")
    out = {}
    for i, variant in enumerate(v for v in VARIANTS if v in registry("adapter")):
        d = root / variant
        extra = ["--rank", "4"] if variant == "lora" else []
        main(["inject", "--backbone", SPEC, "--adapter", variant, "-o", str(d), "--name", variant, *extra])
        out[variant] = perturb_dir(d, seed=i + 1)
    d = root / "bottleneck-inputs"  # layers before attention / MLP and on the embeddings: other hosts' paths
    main(["inject", "--backbone", SPEC, "--adapter", "bottleneck", "-o", str(d), "--name", "inputs",
          "-O", "attn_position=input", "-O", "mlp_position=input", "-O", "embed=true"])
    out["bottleneck-inputs"] = perturb_dir(d, seed=99)
    return out


def _max_fp32(summary) -> float:
    return max(c["max_abs_diff"] for c in summary["checks"] if c["precision"] == "fp32")


@pytest.mark.parametrize("variant,merge", [("bottleneck", True), ("lora", True), ("lora", False), ("ia3", True),
                                           ("fusion", True), ("bottleneck-inputs", True), ("vpt", True),
                                           ("coop", True), ("maple", True), ("clip-adapter", True),
                                           ("tip-adapter", True), ("tip-adapter-f", True), ("dora", True),
                                           ("dora", False), ("vera", True), ("vera", False)])
def test_parity_every_variant(adapter_dirs, tmp_path, variant, merge):
    if variant not in adapter_dirs:
        pytest.skip(f"adapter variant {variant} is not installed")
    out = tmp_path / "out"
    s = export_model(out, adapters=[adapter_dirs[variant]], eval_n=16, merge=merge, options=ExportOptions(seed=0))
    assert s["passed"] and s["backbone"] == SPEC  # the backbone spec comes from the adapter config
    assert _max_fp32(s) < 1e-4
    assert {c["inputs"] for c in s["checks"]} == {"random", "real"}
    assert s["merged"] == ([variant] if merge and variant in MERGED else [])
    files = {f["file"] for f in s["files"]}
    assert {"image_encoder.onnx", "text_encoder.onnx"} <= files
    assert ("pair_scorer.onnx" in files) == (variant == "fusion")
    assert (out / "export.json").is_file() and not list(out.glob(".vlkit-export-*"))


def _merged_lora(tmp: Path, a: Path, b: Path) -> Path:
    """Two LoRA adapters averaged in weight space: `vlkit compose --mode merge`, by hand where it is missing."""
    out = tmp / "merged"
    try:
        from vlkit.compose import compose
    except ImportError:
        compose = None
    if compose is not None:
        compose([str(a), str(b)], "merge", out)
        return out
    from vlkit.adapters.files import read_adapter_weights

    bb = vlkit.load_backbone(SPEC)
    vlkit.load_adapter(bb, a, name="merged")
    wb = read_adapter_weights(b)
    from vlkit.adapters.inject import adapter_parameters

    with torch.no_grad():
        for k, t in adapter_parameters(bb, "merged").items():
            t.copy_((t + wb[k]) / 2)
    vlkit.save_adapter(bb, out, name="merged")
    return out


def test_merged_composition_exports_like_one_adapter(adapter_dirs, tmp_path):
    from vlkit.cli.app import main

    other = tmp_path / "lora2"
    main(["inject", "--backbone", SPEC, "--adapter", "lora", "-o", str(other), "--name", "lora2", "--rank", "4"])
    perturb_dir(other, seed=7)
    merged = _merged_lora(tmp_path, adapter_dirs["lora"], other)
    s = export_model(tmp_path / "out", adapters=[merged], eval_n=16, options=ExportOptions(seed=1))
    assert s["passed"] and _max_fp32(s) < 1e-4
    assert len(s["adapters"]) == 1 and s["adapters"][0]["variant"] == "lora"
    assert s["merged"] == [s["adapters"][0]["name"]]  # folded into the weights: plain projections in the graph


def _vlkit_predictions(adapter: Path, pixels: torch.Tensor, head_state=None, **task_options) -> np.ndarray:
    from vlkit.tasks.classification import ClassificationTask

    bb = vlkit.load_backbone(SPEC)
    vlkit.load_adapter(bb, adapter)
    task = ClassificationTask(bb, None, **task_options)
    if head_state is not None:
        task.load_head_state(head_state)
    return task.predict(bb, {"pixels": pixels}).numpy()


@pytest.fixture(scope="module")
def classifier_export(adapter_dirs, tmp_path_factory):
    """`vlkit export --task classification --fp16 --quantize int8 --json` of the LoRA adapter."""
    out = tmp_path_factory.mktemp("cls") / "out"
    from vlkit.cli.app import main

    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        main(["export", "--adapter", str(adapter_dirs["lora"]), "-o", str(out), "--task", "classification",
              "--eval-n", "64", "--fp16", "--quantize", "int8", "--seed", "5", "--json"])
    return out, json.loads(buf.getvalue())


def test_classifier_same_predictions_as_vlkit(adapter_dirs, classifier_export):
    import onnxruntime as ort

    from vlkit import world

    out, summary = classifier_export
    assert summary["passed"]
    by_precision = {r["precision"]: r for r in summary["scores"]}
    assert set(by_precision) == {"pytorch", "fp32", "fp16", "int8"}
    assert by_precision["fp32"]["agreement"] == 100.0 and by_precision["fp32"]["delta"] == 0.0
    assert all(c["passed"] for c in summary["checks"] if c["precision"] in ("fp32", "fp16"))
    assert not any(c["required"] for c in summary["checks"] if c["precision"] == "int8")

    ds = world.generate("photo", "classification", 64, seed=1000)
    bb = vlkit.load_backbone(SPEC)
    pixels = bb.preprocess_batch(ds["image"])
    expected = _vlkit_predictions(adapter_dirs["lora"], pixels, class_names=world.class_names("photo"),
                                  prompt=world.class_prompt("photo"))
    sess = ort.InferenceSession(str(out / "classifier.onnx"), providers=["CPUExecutionProvider"])
    logits = sess.run(["logits"], {"pixel_values": pixels.numpy()})[0]
    assert logits.shape == (64, len(world.class_names("photo")))
    assert (logits.argmax(-1) == expected).all()

    manifest = json.loads((out / "export.json").read_text())
    assert manifest["preprocessing"]["image_size"] == bb.image_size
    assert manifest["preprocessing"]["mean"] == list(bb.mean) and manifest["preprocessing"]["std"] == list(bb.std)
    assert manifest["task"]["class_names"] == world.class_names("photo")
    assert (out / "tokenizer" / "tokenizer.json").is_file()
    graph = {g["file"]: g for g in manifest["graphs"]}["text_encoder.onnx"]
    assert graph["inputs"] == [{"name": "input_ids", "dtype": "int64", "shape": ["batch", bb.context_length]}]


def test_graph_runs_in_fresh_process_without_vlkit(classifier_export, tmp_path):
    out, _ = classifier_export
    x = np.random.default_rng(0).standard_normal((3, 3, 64, 64)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    code = (
        "import sys, json, numpy as np, onnxruntime as ort\n"
        f"out = {str(out)!r}\n"
        "m = json.load(open(out + '/export.json'))\n"
        "g = [g for g in m['graphs'] if g['graph'] == 'classifier' and g['precision'] == 'fp32'][0]\n"
        "s = ort.InferenceSession(out + '/' + g['file'], providers=['CPUExecutionProvider'])\n"
        f"y = s.run(None, {{g['inputs'][0]['name']: np.load({str(tmp_path / 'x.npy')!r})}})[0]\n"
        f"np.save({str(tmp_path / 'y.npy')!r}, y)\n"
        "assert 'vlkit' not in sys.modules and 'torch' not in sys.modules\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert r.returncode == 0, r.stderr
    y = np.load(tmp_path / "y.npy")
    from vlkit import world

    ref = _vlkit_predictions(Path(json.loads((out / "export.json").read_text())["adapters"][0]["path"]),
                             torch.from_numpy(x), class_names=world.class_names("photo"),
                             prompt=world.class_prompt("photo"))
    assert y.shape == (3, len(world.class_names("photo"))) and (y.argmax(-1) == ref).all()


def test_linear_head_classifier(adapter_dirs, tmp_path):
    """A trained linear head (task.json + head.safetensors as `vlkit train` writes them) is baked in."""
    import shutil

    from safetensors.torch import save_file

    from vlkit import world

    d = tmp_path / "run"
    shutil.copytree(adapter_dirs["bottleneck"], d)
    names = world.class_names("photo")
    g = torch.Generator().manual_seed(3)
    head = {"linear.weight": torch.randn(len(names), 128, generator=g), "linear.bias": torch.randn(len(names), generator=g)}
    save_file(head, str(d / "head.safetensors"))
    (d / "task.json").write_text(json.dumps({"name": "classification", "metric": "accuracy", "options": {
        "class_names": names, "prompt": world.class_prompt("photo"), "head": "linear"}}))
    s = export_model(tmp_path / "out", adapters=[d], task="classification", eval_n=32, options=ExportOptions(seed=2))
    assert s["passed"] and s["manifest"]["task"]["head"] == "linear"
    assert {r["precision"]: r for r in s["scores"]}["fp32"]["agreement"] == 100.0


def test_failed_verification_fails_and_writes_nothing(adapter_dirs, tmp_path, monkeypatch):
    import vlkit.export.base as base

    monkeypatch.setattr(base, "FP32_TOLERANCE", 0.0)
    out = tmp_path / "out"
    with pytest.raises(ExportError, match="differs from PyTorch") as info:
        export_model(out, adapters=[adapter_dirs["bottleneck"]], eval_n=8, options=ExportOptions(seed=0))
    assert info.value.summary and not info.value.summary["passed"]
    assert not out.exists()  # nothing written, not even the directory


def test_cli_bad_input_exits_2(adapter_dirs, tmp_path, capsys):
    code, _, err = cli(["export", "--adapter", str(tmp_path / "nope"), "-o", str(tmp_path / "o")], capsys)
    assert code == 2 and "does not exist" in err
    code, _, err = cli(["export", "--adapter", str(adapter_dirs["lora"]), "-o", str(tmp_path / "o"),
                        "--providers", "NoSuchExecutionProvider"], capsys)
    assert code == 2 and "NoSuchExecutionProvider" in err and "CPUExecutionProvider" in err
    code, _, err = cli(["export", "--adapter", str(adapter_dirs["lora"]), "-o", str(tmp_path / "o"),
                        "--quantize", "int4"], capsys)
    assert code == 2 and "int4" in err
    code, _, err = cli(["export", "--adapter", str(adapter_dirs["lora"]), "-o", str(tmp_path / "o"),
                        "--target", "tflite"], capsys)
    assert code == 2 and "tflite" in err and "onnx" in err


def test_third_party_exporter_plugin(adapter_dirs, tmp_path, reset_plugins):
    """A plugin adds a target through register_exporters and gets the same prepared request."""
    from vlkit.export.base import Check, Exporter
    from vlkit.hookspecs import hookimpl
    from vlkit.plugins import get_plugins

    class TorchScriptExporter(Exporter):
        name = "torchscript"

        def export(self, request):
            result = ExportResult()
            g = request.graph("image_encoder")
            path = request.staging / "image_encoder.pt"
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # torch.jit.trace is deprecated; fine for a stand-in target
                traced = torch.jit.trace(g.module, tuple(g.inputs.values()), check_trace=False)
            traced.save(str(path))
            result.files.append({"graph": g.name, "precision": "fp32", "file": path.name})
            x = request.verify_inputs[g.name]["random"]
            ref = request.reference(g, x)["image_embeds"]
            diff = float(np.abs(traced(*x.values()).detach().numpy() - ref).max())
            result.checks.append(Check(g.name, "fp32", "random", "image_embeds", 3, diff, g.tolerance("image_embeds", "fp32")))
            return result

    class Plugin:
        @hookimpl
        def register_exporters(self, register):
            register("torchscript", TorchScriptExporter(), "TorchScript modules")

    get_plugins().register_plugin(Plugin(), "vlkit-torchscript")
    s = export_model(tmp_path / "out", adapters=[adapter_dirs["bottleneck"]], target="torchscript", eval_n=8)
    assert s["passed"] and s["target"] == "torchscript"
    assert (tmp_path / "out" / "image_encoder.pt").is_file() and (tmp_path / "out" / "export.json").is_file()


@pytest.mark.parametrize("kind", ["open_clip", "hf"])
def test_other_backbones_fp16_and_tokenizer(make_backbone, backbone_specs, tmp_path, kind):
    """open_clip and transformers backbones export too, fp16 included; their tokenizer files come along."""
    bb = make_backbone(kind)
    vlkit.inject(bb, "lora", name="l", rank=2)
    with torch.no_grad():
        for n, p in bb.model.named_parameters():
            if ".adapters." in n:
                p.add_(0.05 * torch.randn_like(p))
    vlkit.save_adapter(bb, tmp_path / "l", name="l")
    out = tmp_path / "out"
    s = export_model(out, backbone=backbone_specs[kind], adapters=[tmp_path / "l"], eval_n=8,
                     options=ExportOptions(fp16=True, seed=0))
    assert s["passed"] and s["merged"] == ["l"] and s["max_abs_diff"]["fp32"] < 1e-4
    assert s["manifest"]["tokenizer"]["files"] and (out / "tokenizer" / s["manifest"]["tokenizer"]["files"][0]).is_file()


def test_tokenizer_shipped_as_is_and_loads_without_vlkit(classifier_export):
    """The tiny tokenizer.json is copied byte for byte; `tokenizers` alone gives the backbone's ids."""
    from tokenizers import Tokenizer

    from vlkit.world.tiny import TOKENIZER_PATH

    out, _ = classifier_export
    shipped = out / "tokenizer" / "tokenizer.json"
    assert shipped.read_bytes() == TOKENIZER_PATH.read_bytes()
    bb = vlkit.load_backbone(SPEC)
    texts = ["a red circle left of a blue square", "Zebra?", ""]
    ids = [e.ids for e in Tokenizer.from_file(str(shipped)).encode_batch(texts)]
    assert ids == bb.tokenize(texts).tolist()


def test_verification_texts_come_from_the_backbones_vocabulary():
    from vlkit.export.api import _random_texts, vocabulary_words

    bb = vlkit.load_backbone(SPEC)
    words = vocabulary_words(bb)
    vocab = bb._tokenizer.get_vocab()
    assert words and all(vocab[w] >= 3 for w in words) and not any(w.startswith("<") for w in words)
    texts = _random_texts(bb, 5, seed=1)
    assert len(texts) == 5 and all(set(t.split()) <= set(words) for t in texts)
    assert _random_texts(bb, 5, seed=1) == texts

    class NoVocab:  # a tokenizer that exposes no vocabulary: random letters
        pass

    class Other:
        _tokenizer = NoVocab()

    assert all(t.replace(" ", "").isalpha() for t in _random_texts(Other(), 3, seed=0))


def test_unknown_domain_fails_before_loading(tmp_path):
    from vlkit.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown world domain 'mars'; domains: photo, medical"):
        export_model(tmp_path / "out", backbone="no-such-backbone", domain="mars")
    assert not (tmp_path / "out").exists()
