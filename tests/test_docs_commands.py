"""What the README and the recipes' comments tell users to run, run as written (issue 27): `vlkit.world.generate`
after a bare `import vlkit`, the README's composing snippet, its `mix` data spec (a manifest mixed with webdataset
shards), the commands in the recipes' comments (train commands load; `recipes/fuse.yaml`'s commands train)."""
from __future__ import annotations

import io
import json
import os
import re
import shlex
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

import vlkit
from cli_helpers import cli
from test_compose import make_adapter

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
RECIPES = ROOT / "recipes"
SPEC = "tiny@random"


def comment_commands(recipe: Path, program: str = "vlkit") -> list[list[str]]:
    """The `#   vlkit ...` command lines of a recipe's comments, split as a shell would."""
    out = []
    for line in recipe.read_text().splitlines():
        m = re.match(rf"#\s+({program} .*)$", line)
        if m:
            out.append(shlex.split(m.group(1).split("  #")[0]))
    return out


def readme_mix_spec() -> str:
    line = next(x for x in README.read_text().splitlines() if x.startswith("train: {mix:"))
    return line.split(": ", 1)[1].split("  #")[0].strip()


def test_world_generate_after_a_bare_import():
    code = "import vlkit\nds = vlkit.world.generate('medical', 'vqa', 6, 0)\nprint(len(ds), ds.column_names)"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300,
                         env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("6 [") and "'question'" in res.stdout
    assert "vlkit.world.generate(domain, task, n, seed)" in README.read_text()
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        vlkit.nope  # noqa: B018


def test_readme_composition_snippet(tmp_path, monkeypatch):
    """The README's composing block, in a folder holding the run directories it names."""
    from vlkit.compose.composition import write_composition
    from vlkit.compose.router import Router, save_router

    runs = tmp_path / "runs"
    runs.mkdir()
    cls, vqa = make_adapter(runs, "med-cls", 1, "lora"), make_adapter(runs, "sat-vqa", 2)
    bb = vlkit.load_backbone(SPEC)
    router = Router(bb.embed_dim, ["med-cls", "sat-vqa", None])
    (runs / "router").mkdir()
    write_composition(runs / "router", "route", bb, [("med-cls", cls), ("sat-vqa", vqa)],
                      extra={"router": save_router(router, runs / "router")})
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    block = next(b for b in blocks if "load_composition" in b)
    monkeypatch.chdir(tmp_path)
    ns = {"vlkit": vlkit, "torch": torch, "pixels": torch.randn(4, 3, 64, 64)}
    exec(compile(block.replace('vlkit.load("tiny")', f'vlkit.load("{SPEC}")'), "README.md", "exec"), ns)
    assert ns["img"].shape[0] == 4 and torch.isfinite(ns["img"]).all()


def _mix_files(where: Path) -> None:
    """a.jsonl (6 images on disk) and b-00.tar .. b-09.tar (2 samples each), what the README's mix line names."""
    from PIL import Image

    (where / "img").mkdir()
    rows = []
    for i in range(6):
        Image.new("RGB", (24, 24), (i * 40, 60, 90)).save(where / "img" / f"{i}.png")
        rows.append({"image": f"img/{i}.png", "label": i % 5, "caption": f"picture {i}"})
    (where / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for s in range(10):
        with tarfile.open(where / f"b-{s:02d}.tar", "w") as tf:
            for k in range(2):
                buf = io.BytesIO()
                Image.new("RGB", (24, 24), (s * 20, k * 90, 30)).save(buf, "PNG")
                for ext, payload in (("png", buf.getvalue()), ("cls", str((s + k) % 5).encode()),
                                     ("txt", f"shard {s} sample {k}".encode())):
                    info = tarfile.TarInfo(f"{s:02d}{k:03d}.{ext}")
                    info.size = len(payload)
                    tf.addfile(info, io.BytesIO(payload))


@pytest.mark.parametrize("task", ["classification", "retrieval"])
def test_readme_mix_of_a_manifest_and_webdataset_shards_loads_aligned(task, tmp_path, monkeypatch):

    from vlkit.data.images import ImageReader
    from vlkit.train.jobs import load_datasets
    from vlkit.train.recipe import load_recipe

    _mix_files(tmp_path)
    monkeypatch.chdir(tmp_path)
    cfg = load_recipe(RECIPES / "quickstart.yaml", [f"data.train={readme_mix_spec()}", f"task.name={task}",
                                                    "data.eval=null", "task.options={}"])
    assert cfg.data.train["mix"][1]["shards"] == "b-{00..09}.tar"
    train, _ = load_datasets(cfg)
    assert len(train) == 6 + 20
    reader = ImageReader(train, "image", "mix")
    images = reader.read(list(range(len(train))))
    assert [im.size for im in images] == [(24, 24)] * 26
    assert images[0].getpixel((0, 0))[:2] == (0, 60) and images[6].getpixel((0, 0))[:2] == (0, 0)
    if task == "classification":
        assert train["label"] == [i % 5 for i in range(6)] + [(s + k) % 5 for s in range(10) for k in range(2)]
    else:
        assert train["caption"][6] == "shard 0 sample 0"


def test_mix_of_images_stored_as_bytes_and_shards(tmp_path):
    """A parquet source holds its images as bytes: the shard references are read into bytes instead."""
    from vlkit.data import load_data
    from vlkit.data.images import ImageReader
    from vlkit.data.mix import mix_datasets

    _mix_files(tmp_path)
    ds = vlkit.world.generate("photo", "retrieval", 4, 0)
    ds.select_columns(["image", "caption"]).to_parquet(str(tmp_path / "p.parquet"))
    parts = [load_data({"kind": "parquet", "path": str(tmp_path / "p.parquet"), "task": "retrieval"}),
             load_data({"kind": "webdataset", "shards": str(tmp_path / "b-0{0..1}.tar"), "task": "retrieval"})]
    mixed = mix_datasets([p.select_columns(["image", "caption"]) for p in parts])
    assert len(mixed) == 8 and len(ImageReader(mixed, "image").read(list(range(8)))) == 8
    from vlkit.errors import DataError

    with pytest.raises(DataError, match="columns"):
        mix_datasets([parts[0], parts[1].select_columns(["image"])], ["p", "w"])


def test_mixed_sources_that_name_their_classes_differently():
    import datasets

    from vlkit.data.mix import mix_datasets

    a = datasets.Dataset.from_dict({"label": [0, 1, 1]}, features=datasets.Features(
        {"label": datasets.ClassLabel(names=["cat", "dog"])}))
    b = datasets.Dataset.from_dict({"label": [0, 1, None]}, features=datasets.Features(
        {"label": datasets.ClassLabel(names=["dog", "fox"])}))
    mixed = mix_datasets([a, b])
    names = mixed.features["label"].names
    assert names == ["cat", "dog", "fox"]
    assert [None if v is None else names[v] for v in mixed["label"]] == ["cat", "dog", "dog", "dog", "fox", None]


def test_a_corrupt_image_file_in_a_mix_is_named(tmp_path, monkeypatch):
    from vlkit.data.images import ImageReader
    from vlkit.errors import DataError
    from vlkit.train.jobs import load_datasets
    from vlkit.train.recipe import load_recipe

    _mix_files(tmp_path)
    (tmp_path / "img" / "2.png").write_bytes(b"not a png")
    monkeypatch.chdir(tmp_path)
    cfg = load_recipe(RECIPES / "quickstart.yaml", [f"data.train={readme_mix_spec()}", "task.name=retrieval",
                                                    "data.eval=null", "task.options={}"])
    train, _ = load_datasets(cfg)
    with pytest.raises(DataError, match=r"row 3, column 'image': cannot decode image file .*img/2\.png"):
        ImageReader(train, "image", "mix").read([0, 1, 2])


@pytest.mark.slow
def test_readme_mix_trains(tmp_path, capsys, monkeypatch):
    _mix_files(tmp_path)
    monkeypatch.chdir(tmp_path)
    code, out, err = cli(["train", str(RECIPES / "quickstart.yaml"), f"data.train={readme_mix_spec()}",
                          "task.options.class_names=[building, field, lake, road, forest]", "optim.steps=3",
                          "optim.batch_size=8", "data.eval.n=16", "eval.every_steps=0", "checkpoint.every_steps=0",
                          "logging.plot=false", "logging.tensorboard=false", "-o", "run", "--json", "--no-progress"],
                         capsys)
    assert code == 0, err
    assert json.loads(out)["steps"] == 3


def test_recipe_comment_train_commands_load(tmp_path, monkeypatch):
    """Every `vlkit train` command in a recipe's comments loads (recipe and overrides), except those naming data
    on a GPU machine's /data or weights an earlier command writes under runs/."""
    from vlkit.train.recipe import load_recipe

    monkeypatch.chdir(ROOT)
    seen = 0
    for recipe in sorted(RECIPES.glob("*.yaml")):
        for argv in comment_commands(recipe) + [c[c.index("vlkit") :] for c in comment_commands(recipe, "accelerate")]:
            if argv[:2] != ["vlkit", "train"] or any("/data/" in a for a in argv) or "@runs/" in Path(argv[2]).read_text():
                continue
            overrides = [a for a in argv[3:] if "=" in a and not a.startswith("-")]
            load_recipe(argv[2], overrides)
            seen += 1
    assert seen >= 5


@pytest.mark.slow
def test_fuse_recipe_comment_commands_train(tmp_path, capsys, monkeypatch):
    """The commands in recipes/fuse.yaml's comment, on three adapters under runs/ (fewer steps and rows)."""
    runs = tmp_path / "runs"
    runs.mkdir()
    for i, name in enumerate(("med-cls", "sat-vqa", "sketch-ret")):
        make_adapter(runs, name, i + 1, "lora")
    (tmp_path / "recipes").symlink_to(RECIPES, target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    commands = comment_commands(RECIPES / "fuse.yaml")
    assert len(commands) == 2 and any("--data" in c for c in commands)
    quick = ["--set", "optim.steps=2", "--set", "optim.batch_size=8", "--set", "data.eval.n=8", "--set",
             "data.train.n=16"]
    for argv in commands:
        code, out, err = cli([*argv[1:], *quick, "--json"], capsys)
        assert code == 0, (argv, err)
        out_dir = Path(argv[argv.index("-o") + 1])
        assert (out_dir / "composition.json").is_file()
    meta = json.loads((Path("runs/fused-vqa") / "task.json").read_text()) if Path("runs/fused-vqa/task.json").is_file() \
        else json.loads((Path("runs/fused-vqa") / "composition.json").read_text())
    assert "vqa" in json.dumps(meta)
