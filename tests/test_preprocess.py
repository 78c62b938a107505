"""Image preprocessing: every backbone's `image_transform` is its library's own eval transform (open_clip's
preprocess, the checkpoint's transformers image processor, torchvision for tiny), picklable, at parity."""
from __future__ import annotations

import json
import pickle
import shutil

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

import vlkit
from vlkit.errors import BackboneLoadError

SIZES = [(640, 427), (1024, 768)]


def _blurred(size, mode="RGB", seed=0):
    """A random image, blurred so that resampling filters matter (as in photos)."""
    rng = np.random.default_rng(seed)
    w, h = size
    shape = (h, w, 3) if mode == "RGB" else (h, w)
    return Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).filter(ImageFilter.GaussianBlur(2))


def _images():
    return [_blurred(s, seed=i) for i, s in enumerate(SIZES)] + [_blurred((500, 333), "L", seed=9)]


def _max_diff(a, b) -> float:
    return float((a - b).abs().max())


def _assert_parity(bb, reference):
    for im in _images():
        x = bb.preprocess(im)
        assert x.shape == (3, bb.image_size, bb.image_size) and x.dtype == torch.float32
        assert _max_diff(x, reference(im)) <= 1e-6, im.size
    batch = bb.preprocess_batch(_images()[:2])
    assert batch.shape == (2, 3, bb.image_size, bb.image_size)


def _assert_pickles(bb):
    transform = pickle.loads(pickle.dumps(bb.image_transform))
    for im in _images():
        assert torch.equal(transform(im), bb.image_transform(im))


def _old_preprocess(image, size, mean, std):
    """The hand-written preprocessing of earlier vlkit releases (PIL bicubic, rounded sizes, floor crop)."""
    image = image.convert("RGB")
    if image.size != (size, size):
        w, h = image.size
        scale = size / min(w, h)
        nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
        image = image.resize((nw, nh), Image.BICUBIC)
        left, top = (nw - size) // 2, (nh - size) // 2
        image = image.crop((left, top, left + size, top + size))
    x = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
    x = x.view(size, size, 3).permute(2, 0, 1).float().div(255.0)
    return (x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)


# --- open_clip ----------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def vit_b_32():
    import open_clip

    bb = vlkit.load_backbone("open_clip:ViT-B-32")  # random init: only the preprocessing matters here
    _, _, reference = open_clip.create_model_and_transforms("ViT-B-32", pretrained=None)
    return bb, reference


def test_open_clip_matches_its_own_preprocess(vit_b_32):
    bb, reference = vit_b_32
    _assert_parity(bb, reference)
    # the hand-written preprocessing this replaces was far off on non-square images
    im = _images()[0]
    assert _max_diff(_old_preprocess(im, bb.image_size, bb.mean, bb.std), reference(im)) > 0.1
    _assert_pickles(bb)


PREPROCESS_CFGS = [
    {"resize_mode": "squash"},
    {"interpolation": "bilinear", "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.5, 0.75]},
    {"resize_mode": "longest", "fill_color": 0},
]


@pytest.mark.parametrize("layout", ["bare", "hub"])
@pytest.mark.parametrize("index", range(len(PREPROCESS_CFGS)))
def test_open_clip_preprocess_cfg_of_a_local_config(tmp_path, tiny_open_clip, layout, index):
    """A config's `preprocess_cfg` (in the architecture file, or open_clip_config.json's hub layout) sets
    the transform exactly as open_clip reads it from a `local-dir:` model."""
    import open_clip

    arch = json.loads(tiny_open_clip["config"].read_text())
    pre = PREPROCESS_CFGS[index]
    hub = {"model_cfg": arch, "preprocess_cfg": pre}
    (tmp_path / "open_clip_config.json").write_text(json.dumps(hub))
    cfg_path = tmp_path / f"tinyoc_pp_{layout}_{index}.json"
    cfg_path.write_text(json.dumps(hub if layout == "hub" else {**arch, "preprocess_cfg": pre}))
    bb = vlkit.load_backbone(f"open_clip:{cfg_path}@{tiny_open_clip['checkpoint']}")
    _, _, reference = open_clip.create_model_and_transforms(f"local-dir:{tmp_path}")
    _assert_parity(bb, reference)
    assert bb.mean == tuple(pre.get("mean", open_clip.OPENAI_DATASET_MEAN))
    assert bb.std == tuple(pre.get("std", open_clip.OPENAI_DATASET_STD))
    default = vlkit.load_backbone(tiny_open_clip["spec"])
    im = _images()[0]
    assert _max_diff(bb.preprocess(im), default.preprocess(im)) > 1e-2
    _assert_pickles(bb)
    # the weights still load: the preprocess keys never reach the model
    ref_model = vlkit.load_backbone(tiny_open_clip["spec"]).model.state_dict()
    for k, v in bb.model.state_dict().items():
        assert torch.equal(v, ref_model[k]), k


def test_open_clip_bad_preprocess_cfg(tmp_path, tiny_open_clip):
    arch = json.loads(tiny_open_clip["config"].read_text())
    for i, pre in enumerate([{"interpolation": "nearest"}, {"resize_mode": "fit"}, {"size": 48}]):
        cfg_path = tmp_path / f"tinyoc_bad_{i}.json"
        cfg_path.write_text(json.dumps({**arch, "preprocess_cfg": pre}))
        with pytest.raises(BackboneLoadError, match="preprocess"):
            vlkit.load_backbone(f"open_clip:{cfg_path}")
    cfg_path = tmp_path / "tinyoc_bad_type.json"
    cfg_path.write_text(json.dumps({**arch, "preprocess_cfg": [1, 2]}))
    with pytest.raises(BackboneLoadError, match="preprocess_cfg"):
        vlkit.load_backbone(f"open_clip:{cfg_path}")


# --- transformers -------------------------------------------------------------------------------------------------

def _hf_dir_with_processor(src, dst, processor):
    shutil.copytree(src, dst)
    processor.save_pretrained(dst)
    return dst


def test_hf_uses_the_checkpoint_image_processor(tmp_path, hf_clip_dir):
    from transformers import AutoImageProcessor, CLIPImageProcessor

    proc = CLIPImageProcessor(size={"shortest_edge": 40}, crop_size={"height": 32, "width": 32}, resample=2,
                              image_mean=[0.5, 0.5, 0.5], image_std=[0.25, 0.5, 0.75])
    d = _hf_dir_with_processor(hf_clip_dir, tmp_path / "clip", proc)
    assert (d / "preprocessor_config.json").is_file()
    bb = vlkit.load_backbone(f"hf:{d}")
    assert bb.image_size == 32 and bb.mean == (0.5, 0.5, 0.5) and bb.std == (0.25, 0.5, 0.75)
    reference = AutoImageProcessor.from_pretrained(d)
    _assert_parity(bb, lambda im: reference(images=im, return_tensors="pt")["pixel_values"][0])
    default = vlkit.load_backbone(f"hf:{hf_clip_dir}")
    im = _images()[0]
    assert _max_diff(bb.preprocess(im), default.preprocess(im)) > 1e-2
    _assert_pickles(bb)
    # the tokenizer comes from the same directory
    assert torch.equal(bb.tokenize(["that hat"]), default.tokenize(["that hat"]))


def test_hf_without_processor_config_uses_a_clip_processor(hf_clip_dir):
    from transformers import CLIPImageProcessor

    assert not (hf_clip_dir / "preprocessor_config.json").exists()
    bb = vlkit.load_backbone(f"hf:{hf_clip_dir}")
    reference = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    assert bb.image_size == 32 and bb.mean == tuple(reference.image_mean) and bb.std == tuple(reference.image_std)
    _assert_parity(bb, lambda im: reference(images=im, return_tensors="pt")["pixel_values"][0])
    _assert_pickles(bb)


def test_hf_processor_saved_with_a_processor(tmp_path, hf_clip_dir):
    """CLIPProcessor.save_pretrained writes processor_config.json (transformers 5); it is read as well."""
    from transformers import AutoImageProcessor, AutoTokenizer, CLIPImageProcessor, CLIPProcessor

    d = tmp_path / "clip"
    shutil.copytree(hf_clip_dir, d)
    proc = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 48},
                                                            crop_size={"height": 32, "width": 32}, resample=2),
                         tokenizer=AutoTokenizer.from_pretrained(d))
    proc.save_pretrained(d)
    bb = vlkit.load_backbone(f"hf:{d}")
    reference = AutoImageProcessor.from_pretrained(d)
    _assert_parity(bb, lambda im: reference(images=im, return_tensors="pt")["pixel_values"][0])


def test_hf_processor_of_the_wrong_size(tmp_path, hf_clip_dir):
    from transformers import CLIPImageProcessor

    proc = CLIPImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
    d = _hf_dir_with_processor(hf_clip_dir, tmp_path / "clip", proc)
    with pytest.raises(BackboneLoadError, match="28x28"):
        vlkit.load_backbone(f"hf:{d}")


# --- tiny and plugins ---------------------------------------------------------------------------------------------

def test_tiny_is_bit_identical_on_world_images():
    from vlkit.world.tiny import tiny_config
    from vlkit.world import generate

    bb = vlkit.load_backbone("tiny@random")
    pre = tiny_config()["preprocess"]
    ds = generate("photo", "classification", 8, seed=0)
    for row in ds:
        im = row["image"]
        assert im.size == (bb.image_size, bb.image_size)
        assert torch.equal(bb.preprocess(im), _old_preprocess(im, bb.image_size, pre["mean"], pre["std"]))
    _assert_pickles(bb)


def test_tiny_matches_torchvision_on_other_sizes():
    from torchvision import transforms as T

    bb = vlkit.load_backbone("tiny@random")
    s = bb.image_size
    reference = T.Compose([lambda im: im.convert("RGB"), T.Resize(s, interpolation=T.InterpolationMode.BICUBIC),
                           T.CenterCrop(s), T.ToTensor(), T.Normalize(bb.mean, bb.std)])
    _assert_parity(bb, reference)


def test_plugin_backbone_without_its_own_transform(hf_clip_dir):
    """A backbone that sets no transform gets torchvision's of its image_size, mean and std."""
    from transformers import CLIPModel

    from vlkit.backbones.base import shortest_edge_transform
    from vlkit.backbones.hf import HFBackbone

    bb = HFBackbone(CLIPModel.from_pretrained(hf_clip_dir).eval(), "hf:test", None, 32, (0.5,) * 3, (0.5,) * 3, 16)
    reference = shortest_edge_transform(32, (0.5,) * 3, (0.5,) * 3)
    _assert_parity(bb, reference)
    assert bb.image_transform is bb.image_transform
    bb.mean = (0.25,) * 3
    assert _max_diff(bb.preprocess(_images()[0]), reference(_images()[0])) > 0.1
    _assert_pickles(bb)
    with pytest.raises(TypeError):
        bb.preprocess(torch.zeros(3, 8, 8))
