"""Image files reach the backbone's own preprocessing as they are: real photos saved in every mode (RGB, L, RGBA
with transparency, P, P with a transparent palette entry, CMYK, I;16) as PNG, JPEG and TIFF, read through every
path that reads files or bytes (data kinds and the pipeline's workers, the probes, `compose run`, `serve`,
export's verification inputs), equal the library's own preprocessing of the same file (max abs diff <= 1e-6)
for open_clip (default and longest-side resize with pad), transformers CLIP and SigLIP, and `tiny`."""
from __future__ import annotations

import base64
import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_helpers import cli
from conftest import TINY_OPEN_CLIP_CONFIG, write_tiny_clip_tokenizer
from PIL import Image

import vlkit
from vlkit.errors import DataError
from vlkit.imagefile import ImageDecodeError, open_image

SIZE = (72, 48)  # non-square: the crop (or the pad) matters
FORMATS = {"PNG": ("RGB", "L", "RGBA", "P", "PA", "I;16"), "JPEG": ("RGB", "L", "CMYK"),
           "TIFF": ("RGB", "L", "RGBA", "P", "CMYK", "I;16")}
EXT = {"PNG": "png", "JPEG": "jpg", "TIFF": "tiff"}
FILES = [f"{m.replace(';', '')}.{EXT[fmt]}".lower() for fmt, modes in FORMATS.items() for m in modes]
LIBRARIES = ("open_clip", "open_clip_longest", "hf_clip", "hf_siglip")
BACKBONES = LIBRARIES + ("tiny",)
TOL = 1e-6
pytestmark = pytest.mark.filterwarnings("ignore:Palette images with Transparency:UserWarning")  # open_clip's


def photo() -> Image.Image:
    """A real photo (scikit-learn's sample image), small."""
    from sklearn.datasets import load_sample_image

    return Image.fromarray(load_sample_image("china.jpg")).crop((100, 60, 460, 300)).resize(SIZE, Image.BICUBIC)


def in_mode(rgb: Image.Image, mode: str) -> Image.Image:
    """`rgb` as `mode`; RGBA and PA have real transparency: fully clear, half and opaque regions."""
    alpha = np.full(rgb.size[::-1], 255, np.uint8)
    alpha[:, : SIZE[0] // 3] = 0
    alpha[SIZE[1] * 2 // 3:, SIZE[0] // 3:] = 96
    if mode == "RGBA":
        im = rgb.copy()
        im.putalpha(Image.fromarray(alpha))
        return im
    if mode == "PA":  # a palette with transparent entries (PNG tRNS)
        return in_mode(rgb, "RGBA").quantize(64)
    if mode == "P":
        return rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    if mode == "I;16":
        return Image.fromarray(np.asarray(rgb.convert("L")).astype(np.uint16) * 257)
    return rgb.convert(mode)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("modes")
    rgb, out = photo(), {}
    for fmt, modes in FORMATS.items():
        for mode in modes:
            path = d / f"{mode.replace(';', '')}.{EXT[fmt]}".lower()
            in_mode(rgb, mode).save(path, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
            out[path.name] = path
    assert list(out) == FILES
    return out


def test_files_are_what_they_claim(files):
    modes = {name: Image.open(p).mode for name, p in files.items()}
    assert modes["rgba.png"] == modes["rgba.tiff"] == "RGBA" and modes["cmyk.jpg"] == modes["cmyk.tiff"] == "CMYK"
    assert modes["p.png"] == modes["pa.png"] == "P" and modes["i16.png"] == modes["i16.tiff"] == "I;16"
    assert Image.open(files["pa.png"]).info.get("transparency") is not None
    assert np.asarray(Image.open(files["rgba.png"]))[..., 3].min() == 0


# --- the backbones and their libraries' own preprocessing of a file -------------------------------------------

def _open_clip(tmp: Path, tiny_open_clip, pre: dict):
    import open_clip

    tmp.mkdir()
    (tmp / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_OPEN_CLIP_CONFIG, "preprocess_cfg": pre}))
    cfg = tmp / f"tinyoc_{tmp.name}.json"
    cfg.write_text(json.dumps({**TINY_OPEN_CLIP_CONFIG, "preprocess_cfg": pre}))
    _, _, reference = open_clip.create_model_and_transforms(f"local-dir:{tmp}")
    return f"open_clip:{cfg}@{tiny_open_clip['checkpoint']}", reference


def _hf(d: Path, processor):
    from transformers import AutoImageProcessor

    processor.save_pretrained(d)
    reference = AutoImageProcessor.from_pretrained(d)
    return f"hf:{d}", lambda im: reference(images=im, return_tensors="pt")["pixel_values"][0]


def _siglip_dir(d: Path) -> Path:
    from transformers import SiglipConfig, SiglipModel

    d.mkdir()
    tok = write_tiny_clip_tokenizer(d)
    eot = tok.convert_tokens_to_ids("<|endoftext|>")
    cfg = SiglipConfig(
        text_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                         max_position_embeddings=16, vocab_size=len(tok), pad_token_id=eot, eos_token_id=eot),
        vision_config=dict(hidden_size=32, image_size=32, patch_size=8, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=64))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        SiglipModel(cfg).eval().save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def library(tmp_path_factory, tiny_open_clip, hf_clip_dir):
    """library(name) -> (spec, backbone, the library's own preprocessing of a PIL image), built once per name."""
    from transformers import CLIPImageProcessor, SiglipImageProcessor

    from vlkit.backbones.base import shortest_edge_transform

    made: dict[str, tuple] = {}

    def get(name: str):
        if name not in made:
            tmp = tmp_path_factory.mktemp(name)
            if name == "open_clip":
                spec, ref = _open_clip(tmp / "oc", tiny_open_clip, {})
            elif name == "open_clip_longest":
                spec, ref = _open_clip(tmp / "oc", tiny_open_clip, {"resize_mode": "longest"})
            elif name == "hf_clip":
                d = shutil.copytree(hf_clip_dir, tmp / "clip")
                proc = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
                spec, ref = _hf(d, proc)
            elif name == "hf_siglip":
                spec, ref = _hf(_siglip_dir(tmp / "siglip"), SiglipImageProcessor(size={"height": 32, "width": 32}))
            else:
                spec = "tiny@random"
                bb = vlkit.load_backbone(spec)
                ref = shortest_edge_transform(bb.image_size, bb.mean, bb.std)
            made[name] = (spec, vlkit.load_backbone(spec).eval(), ref)
        return made[name]

    return get


def reference_of(ref, path: Path) -> torch.Tensor:
    """What a user of the library gets for the file: its preprocessing of `Image.open(path)`."""
    with Image.open(path) as im:
        return ref(im).to(torch.float32)


def assert_library_pixels(pixels: torch.Tensor, names: list[str], files, ref):
    assert len(pixels) == len(names)
    for x, name in zip(pixels, names):
        diff = float((x - reference_of(ref, files[name])).abs().max())
        assert diff <= TOL, (name, diff)


def test_converting_first_differs_for_the_libraries(files, library):
    """What the tests below guard against: `.convert("RGB")` before the transform changes the input."""
    worst = {}
    for name in LIBRARIES:
        _, _, ref = library(name)
        worst[name] = {f: float((reference_of(ref, files[f]) - ref(Image.open(files[f]).convert("RGB"))).abs().max())
                       for f in ("rgba.png", "pa.png", "p.png", "cmyk.jpg")}
    assert all(w["rgba.png"] > 0.1 and w["pa.png"] > 0.1 for w in worst.values()), worst
    assert worst["open_clip"]["p.png"] > 0.1 and worst["open_clip_longest"]["cmyk.jpg"] > 0.1, worst


# --- decoding ----------------------------------------------------------------------------------------------------

def test_decoding_keeps_the_mode_and_the_palette(files):
    for name, path in files.items():
        im, plain = open_image(path), Image.open(path)
        assert im.mode == plain.mode and im.size == plain.size, name
        assert np.array_equal(np.asarray(im), np.asarray(plain)), name
        assert open_image(path.read_bytes()).mode == plain.mode
    assert open_image(files["pa.png"]).info.get("transparency") == Image.open(files["pa.png"]).info["transparency"]


def test_decoding_applies_exif_orientation_and_refuses_bad_files(tmp_path, monkeypatch):
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    rotated = tmp_path / "rotated.jpg"
    photo().save(rotated, exif=exif)
    assert Image.open(rotated).size == SIZE and open_image(rotated).size == SIZE[::-1]
    cut = tmp_path / "cut.png"
    photo().save(cut)
    cut.write_bytes(cut.read_bytes()[:600])
    with pytest.raises(ImageDecodeError, match=r"cut\.png.*not a readable image") as exc:
        open_image(cut)
    assert isinstance(exc.value, DataError) and not exc.value.too_large
    with pytest.raises(ImageDecodeError, match="not a known image format"):
        open_image(b"not an image")
    with pytest.raises(ImageDecodeError, match="empty"):
        open_image(b"")
    with pytest.raises(ImageDecodeError, match="over the limit") as exc:
        open_image(rotated, max_pixels=100)
    assert exc.value.too_large
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # a decompression bomb: over twice PIL's limit
    with pytest.raises(ImageDecodeError, match="decompression-bomb") as exc:
        open_image(rotated)
    assert exc.value.too_large


def test_tiny_transform_converts_each_mode_as_it_states(files):
    from vlkit.backbones.base import to_rgb

    rgba = Image.open(files["rgba.png"])
    a = np.asarray(rgba, dtype=np.float64)
    white = a[..., :3] * a[..., 3:] / 255 + 255 * (1 - a[..., 3:] / 255)
    assert np.abs(np.asarray(to_rgb(rgba), dtype=np.float64) - white).max() <= 1  # composited onto white
    assert (np.asarray(to_rgb(rgba))[:, 0] == 255).all()  # the fully transparent strip is white, not its colour
    pa = Image.open(files["pa.png"])
    assert (np.asarray(to_rgb(pa))[:, 0] == 255).all()
    i16 = Image.open(files["i16.png"])
    grey = np.asarray(Image.open(files["l.png"]))
    assert np.array_equal(np.asarray(to_rgb(i16))[..., 0], grey)  # 16-bit scaled back to the 8-bit values
    for name in ("p.png", "cmyk.jpg", "l.jpg"):
        im = Image.open(files[name])
        assert np.array_equal(np.asarray(to_rgb(im)), np.asarray(im.convert("RGB"))), name
    rgb = Image.open(files["rgb.png"])
    assert to_rgb(rgb) is rgb


# --- data kinds and the pipeline ---------------------------------------------------------------------------------

def _write_sources(root: Path, files) -> dict[str, str | dict]:
    """The files in the layout of each data kind; every row's caption names its file."""
    import datasets

    root.mkdir(exist_ok=True)
    rows = [{"image": str(p), "caption": name, "label": ("circle", "square")[i % 2]} for i, (name, p) in enumerate(files.items())]
    manifest = root / "m.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    folder = root / "folder"
    folder.mkdir()
    for name, p in files.items():
        shutil.copy(p, folder / name)
    (folder / "metadata.jsonl").write_text("".join(json.dumps({"file_name": n, "caption": n}) + "\n" for n in files))
    shard = root / "s-0000.tar"
    with tarfile.open(shard, "w") as tar:
        for i, (name, p) in enumerate(files.items()):
            for ext, data in ((p.suffix[1:], p.read_bytes()), ("txt", name.encode())):
                info = tarfile.TarInfo(f"{i:06d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    feats = datasets.Features({"image": datasets.Image(), "caption": datasets.Value("string")})
    ds = datasets.Dataset.from_dict({"image": [{"bytes": p.read_bytes(), "path": None} for p in files.values()],
                                     "caption": list(files)}, features=feats)
    (root / "pq").mkdir()
    ds.to_parquet(str(root / "pq" / "train-00000-of-00001.parquet"))
    ds.save_to_disk(str(root / "saved"))
    coop = root / "coop"
    shutil.copytree(folder, coop / "images", ignore=shutil.ignore_patterns("*.jsonl"))
    (coop / "split_zhou_Modes.json").write_text(json.dumps(
        {"test": [[name, i % 2, ("circle", "square")[i % 2]] for i, name in enumerate(files)]}))
    return {"manifest": f"manifest:{manifest}", "imagefolder": f"imagefolder:{folder}",
            "webdataset": {"kind": "webdataset", "shards": str(shard)}, "parquet": f"parquet:{root / 'pq'}",
            "hf": f"hf:{root / 'saved'}", "coop": {"kind": "coop", "source": str(coop), "split": "test"}}


@pytest.fixture(scope="module")
def sources(tmp_path_factory, files):
    return _write_sources(tmp_path_factory.mktemp("sources"), files)


@pytest.mark.parametrize("name", BACKBONES)
def test_data_kinds_reach_the_library_transform(name, files, sources, library):
    from vlkit.data import load_data
    from vlkit.data.pipeline import iter_batches
    from vlkit.tasks.base import prepare_pixels

    _, bb, ref = library(name)
    for kind, spec in sources.items():
        ds = load_data(spec)
        names = list(ds["caption"]) if "caption" in ds.column_names else list(files)
        assert sorted(names) == sorted(files), kind
        assert_library_pixels(prepare_pixels(bb, ds).materialize(), names, files, ref)
    lazy = prepare_pixels(bb, load_data(sources["manifest"]))  # decoded in DataLoader worker processes
    lazy.loader_options["num_workers"] = 2
    pixels = torch.cat([b["pixels"] for b in iter_batches({"pixels": lazy}, 4)])
    assert_library_pixels(pixels, list(files), files, ref)


def test_augment_sees_the_image_in_its_mode(files, library):
    import datasets

    from vlkit.data.pipeline import build_augment
    from vlkit.tasks.base import prepare_pixels

    _, bb, _ = library("tiny")
    ds = datasets.Dataset.from_dict({"image": [str(files["rgba.png"]), str(files["pa.png"])]},
                                    features=datasets.Features({"image": datasets.Image()}))
    seen = []
    flip = build_augment(["RandomHorizontalFlip"], bb.image_size)
    lazy = prepare_pixels(bb, ds).with_augment(lambda im: seen.append(im.mode) or flip(im), seed=0)
    assert lazy.fetch([0, 1], epoch=0).shape == (2, 3, bb.image_size, bb.image_size)
    assert seen == ["RGBA", "P"]
    jitter = prepare_pixels(bb, ds).with_augment(build_augment([{"ColorJitter": {"brightness": 0.5}}], 32), 0)
    with pytest.raises(DataError, match=r"row 2: data\.augment cannot transform this P image") as exc:
        jitter.fetch([1], epoch=0)
    assert "RGB" in str(exc.value.hint)
    ok = prepare_pixels(bb, ds).with_augment(build_augment(["RGB", {"ColorJitter": {"brightness": 0.5}}], 32), 0)
    assert ok.fetch([1], epoch=0).shape[0] == 1


# --- probes ------------------------------------------------------------------------------------------------------

PAIRS = [("rgba.png", "pa.png"), ("p.png", "cmyk.jpg"), ("cmyk.tiff", "rgba.tiff"), ("i16.png", "l.jpg"),
         ("rgb.jpg", "p.tiff")]
CAPTIONS = [("a red cat", "a cat that hat"), ("that hat", "a hat"), ("the cat", "a hat the"), ("at", "he"),
            ("a cat at the hat", "the hat at a cat")]


@pytest.fixture(scope="module")
def wino_dir(tmp_path_factory, files) -> Path:
    """A local Winoground copy (examples.jsonl + images/) of transparent, palette, CMYK and 16-bit files."""
    d = tmp_path_factory.mktemp("wino")
    (d / "images").mkdir()
    rows = []
    for i, ((a, b), (c0, c1)) in enumerate(zip(PAIRS, CAPTIONS)):
        for k, f in enumerate((a, b)):
            shutil.copy(files[f], d / "images" / f"ex_{i}_img_{k}{files[f].suffix}")
        rows.append({"id": i, "image_0": f"ex_{i}_img_0", "image_1": f"ex_{i}_img_1", "caption_0": c0,
                     "caption_1": c1, "tag": "Object", "secondary_tag": "", "num_main_preds": 1,
                     "collapsed_tag": "Object"})
    (d / "examples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d


@pytest.mark.parametrize("name", BACKBONES)
def test_probe_image_loading(name, files, wino_dir, library):
    from vlkit.probe.caption_pairs import pair_batches
    from vlkit.probe.winoground import load_winoground_data, winoground_batches

    _, bb, ref = library(name)
    ds, _ = load_winoground_data(str(wino_dir))
    images, captions = winoground_batches(ds)(0, len(PAIRS))
    assert captions == [list(c) for c in CAPTIONS]
    assert_library_pixels(bb.preprocess_batch([im for pair in images for im in pair]),
                          [f for pair in PAIRS for f in pair], files, ref)
    examples = [{"image": str(files[f]), "true": "a cat", "false": "a hat"} for f in files]
    images, _ = pair_batches(examples)(0, len(examples))
    assert_library_pixels(bb.preprocess_batch([ims[0] for ims in images]), list(files), files, ref)


@pytest.mark.parametrize("name", LIBRARIES)
def test_probe_dumped_scores_equal_the_library_preprocessing(name, files, wino_dir, library, tmp_path, capsys):
    """`vlkit probe winoground --scores` on transparent, palette and CMYK files: each dumped score equals the
    backbone's score of the library's own preprocessing of the files (and not of their RGB conversion)."""
    from vlkit.scoring import pair_scores

    spec, bb, ref = library(name)
    out = tmp_path / "scores.jsonl"
    code, _, err = cli(["probe", "winoground", "--backbone", spec, "--data", str(wino_dir), "--scores", str(out),
                        "--bootstrap", "5", "--no-progress", "--batch-size", "2"], capsys)
    assert code == 0, err
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == list(range(len(PAIRS))) and {r["system"] for r in rows} == {"backbone"}
    worst_rgb = 0.0
    for row, pair, caps in zip(rows, PAIRS, CAPTIONS):
        dumped = torch.tensor([[row["c0_i0"], row["c0_i1"]], [row["c1_i0"], row["c1_i1"]]])
        tokens = bb.tokenize(list(caps))
        with torch.no_grad():
            own = pair_scores(bb, torch.stack([reference_of(ref, files[f]) for f in pair]), tokens)
            rgb = pair_scores(bb, torch.stack([ref(Image.open(files[f]).convert("RGB")) for f in pair]), tokens)
        assert torch.allclose(dumped, own.float(), atol=1e-4), (pair, dumped, own)
        worst_rgb = max(worst_rgb, float((dumped - rgb).abs().max()))
    assert worst_rgb > 1e-3  # converting first would have given other scores


# --- compose run, serve, export ----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", BACKBONES)
def test_compose_run_passes_files_as_they_are(name, files, library, monkeypatch, tmp_path):
    from vlkit.cli.compose_cmd import _run

    spec, bb, ref = library(name)
    seen = {}

    def fake_run(backbone, path, images, texts=None, **kw):
        seen["pixels"] = backbone.preprocess_batch(images)
        return {}

    monkeypatch.setattr("vlkit.compose.composition.read_composition", lambda path: {"backbone": spec})
    monkeypatch.setattr("vlkit.compose.predict.run_composition", fake_run)
    _run(tmp_path, [files[f] for f in files], None, None, None, None, None)
    assert_library_pixels(seen["pixels"], list(files), files, ref)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n broken")
    with pytest.raises(DataError, match=r"bad\.png: not a readable image"):
        _run(tmp_path, [bad], None, None, None, None, None)


@pytest.mark.parametrize("name", BACKBONES)
def test_serve_decodes_base64_data_uris_and_multipart_as_they_are(name, files, library):
    from starlette.testclient import TestClient

    from vlkit.serve import ServeConfig, create_app
    from vlkit.serve.backends import TorchBackend

    spec, bb, ref = library(name)
    backend = TorchBackend(spec)
    seen = []
    own = backend.preprocess
    backend.preprocess = lambda im: seen.append(own(im)) or seen[-1]
    app = create_app(ServeConfig(backbone=spec, max_batch=4, max_wait_ms=1), backend=backend)
    names = list(files)
    with TestClient(app) as c:
        for i, f in enumerate(names):
            raw = files[f].read_bytes()
            if i % 3 == 0:
                r = c.post("/v1/embed", json={"image": base64.b64encode(raw).decode()})
            elif i % 3 == 1:
                r = c.post("/v1/embed", json={"image": "data:image/x;base64," + base64.b64encode(raw).decode()})
            else:
                r = c.post("/v1/embed", files={"image": (f, raw, "application/octet-stream")})
            assert r.status_code == 200, (f, r.text)
            with torch.no_grad():
                want = bb.encode_image(reference_of(ref, files[f])[None], normalize=True)[0]
            assert torch.allclose(torch.tensor(r.json()["embedding"]), want, atol=1e-5), f
    assert_library_pixels(torch.stack(seen), names, files, ref)


@pytest.mark.parametrize("name", BACKBONES)
def test_export_verification_inputs_are_the_library_preprocessing(name, files, sources, library, monkeypatch,
                                                                   tmp_path):
    import vlkit.export.api as export_api

    spec, _, ref = library(name)
    seen = {}

    class Stop(Exception):
        pass

    def capture(backbone, graphs, data, *args, **kwargs):
        seen["pixels"] = data["pixels"]
        raise Stop

    monkeypatch.setattr(export_api, "_verify_inputs", capture)
    with pytest.raises(Stop):
        export_api.export_model(tmp_path / "out", backbone=spec, task="classification",
                                eval_data=sources["manifest"], eval_n=len(files))
    assert_library_pixels(seen["pixels"], list(files), files, ref)
