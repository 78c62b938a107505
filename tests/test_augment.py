"""Photometric augmentation (vlkit.tasks.augment) and its use in retrieval pre-training."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from vlkit.data.pipeline import materialize

import vlkit
from vlkit.errors import ConfigError
from vlkit.tasks.augment import PhotometricAugment
from vlkit.tasks.retrieval import RetrievalTask

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
COLOURS = ["red", "orange", "yellow", "green", "blue", "purple", "black"]


def _pixels(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    raw = torch.rand(n, 3, 16, 16, generator=g)
    return (raw - 0.5) / 0.25


def test_same_seed_same_augmentation_and_p0_is_identity():
    px = _pixels()
    torch.manual_seed(3)
    a, ga = PhotometricAugment()(px, MEAN, STD)
    torch.manual_seed(3)
    b, gb = PhotometricAugment()(px, MEAN, STD)
    assert torch.equal(a, b) and torch.equal(ga, gb)
    assert not torch.equal(a, px)
    same, grey = PhotometricAugment(p=0.0)(px, MEAN, STD)
    assert torch.allclose(same, px, atol=1e-6) and not grey.any()


def test_grey_images_have_equal_channels_and_values_stay_in_range():
    px = _pixels(16)
    torch.manual_seed(0)
    out, grey = PhotometricAugment(grayscale=1.0, p=1.0, noise=0.0)(px, MEAN, STD)
    assert grey.all()
    raw = out * 0.25 + 0.5
    assert torch.allclose(raw[:, 0], raw[:, 1], atol=1e-6) and torch.allclose(raw[:, 1], raw[:, 2], atol=1e-6)
    assert raw.min() >= -1e-6 and raw.max() <= 1 + 1e-6


def test_contrast_factor_shrinks_deviation_from_the_mean():
    px = _pixels(4)
    torch.manual_seed(0)
    aug = PhotometricAugment(grayscale=0.0, contrast=(0.5, 0.5), brightness=0.0, illumination=0.0, noise=0.0,
                             blur=0.0, p=1.0)
    out, _ = aug(px, MEAN, STD)
    raw_in, raw_out = px * 0.25 + 0.5, out * 0.25 + 0.5
    mu = raw_in.mean(dim=(1, 2, 3), keepdim=True)
    assert torch.allclose(raw_out, mu + 0.5 * (raw_in - mu), atol=1e-5)


@pytest.mark.parametrize("value, word", [({"grayscale": 2.0}, "grayscale"), ({"contrast": [0.0, 1.0]}, "contrast"),
                                         ({"noise": -1}, "noise"), ({"sharpen": 1}, "sharpen"), ("yes", "augment")])
def test_bad_augment_options_name_the_option(value, word):
    with pytest.raises(ConfigError, match=word):
        PhotometricAugment.from_option(value)


def test_retrieval_augment_drops_colour_words_of_grey_images_only():
    bb = vlkit.load_backbone("tiny@random")
    task = RetrievalTask(bb, None, augment={"grayscale": 1.0, "p": 1.0, "grayscale_drop": COLOURS})
    tok = bb.tokenize(["a red circle left of a blue square", "a circle"])
    batch = {"pixels": torch.zeros(2, 3, bb.image_size, bb.image_size), "tokens": tok,
             "caption_ids": torch.tensor([0, 1])}
    out = task.augment_batch(batch, bb)
    colour_ids = bb.tokenize(" ".join(COLOURS))[0]
    colour_ids = colour_ids[(colour_ids > 2) & (colour_ids != colour_ids.max())]
    assert not torch.isin(out["tokens"][0], colour_ids).any()
    assert torch.equal(out["tokens"][1], tok[1]) and "caption_ids" not in out
    none = RetrievalTask(bb, None, augment={"grayscale": 0.0, "p": 1.0, "grayscale_drop": COLOURS})
    assert torch.equal(none.augment_batch(batch, bb)["tokens"], tok)


def test_retrieval_loss_with_augment_is_finite_and_bad_options_fail():
    from vlkit import world

    bb = vlkit.load_backbone("tiny@random")
    ds = world.generate("photo", "retrieval", 8, seed=0)
    task = RetrievalTask(bb, ds, augment=True, swap_groups=[COLOURS])
    data = materialize(task.prepare(bb, ds))
    torch.manual_seed(0)
    loss = task.loss(bb, data)
    assert torch.isfinite(loss)
    with pytest.raises(ConfigError, match="augment"):
        RetrievalTask(bb, ds, augment={"bogus": 1})


# ---------------------------------------------------------------- data.augment lists from YAML and overrides

AUGMENT = "[{RandomResizedCrop: {scale: [0.5, 1]}}, RandomHorizontalFlip]"
QUICK = ["optim.steps=2", "data.train.n=16", "data.eval.n=8", "eval.every_steps=0", "checkpoint.every_steps=0",
         "backbone=tiny@random"]


def test_build_augment_takes_the_readme_list_from_a_recipe_file_and_an_override(tmp_path):
    from PIL import Image

    from vlkit.data.pipeline import build_augment
    from vlkit.train.recipe import load_recipe

    root = Path(__file__).resolve().parents[1]
    recipe = tmp_path / "aug.yaml"
    recipe.write_text((root / "recipes" / "quickstart.yaml").read_text().replace(
        "data:\n", f"data:\n  augment: {AUGMENT}\n", 1))
    from_file = load_recipe(recipe).data.augment
    from_override = load_recipe(root / "recipes" / "quickstart.yaml", [f"data.augment={AUGMENT}"]).data.augment
    plain = [{"RandomResizedCrop": {"scale": [0.5, 1]}}, "RandomHorizontalFlip"]
    im = Image.effect_mandelbrot((48, 40), (-2, -1.5, 1, 1.5), 50).convert("RGB")
    outputs = []
    from omegaconf import OmegaConf

    for spec in (from_file, from_override, plain, OmegaConf.create(plain)):
        aug = build_augment(spec, 24)
        assert [type(t).__name__ for t in aug.transforms] == ["RandomResizedCrop", "RandomHorizontalFlip"]
        assert aug.transforms[0].scale == (0.5, 1) and list(aug.transforms[0].size) == [24, 24]
        torch.manual_seed(0)
        outputs.append(np.asarray(aug(im)))
    assert isinstance(from_file, list) and isinstance(from_override, list)  # the typed recipe holds plain lists
    assert all(np.array_equal(outputs[0], o) for o in outputs[1:])


@pytest.mark.parametrize("route", ["file", "override"])
def test_train_with_the_readme_augment_list(route, tmp_path, capsys):
    from cli_helpers import cli

    root = Path(__file__).resolve().parents[1]
    recipe = root / "recipes" / "quickstart.yaml"
    extra = [f"data.augment={AUGMENT}"]
    if route == "file":
        recipe = tmp_path / "aug.yaml"
        recipe.write_text((root / "recipes" / "quickstart.yaml").read_text().replace(
            "data:\n", f"data:\n  augment: {AUGMENT}\n", 1))
        extra = []
    code, _, err = cli(["train", str(recipe), *extra, *QUICK, "-o", str(tmp_path / "run")], capsys)
    assert code == 0, err
    written = (tmp_path / "run" / "recipe.yaml").read_text()
    assert "RandomResizedCrop" in written and "RandomHorizontalFlip" in written
