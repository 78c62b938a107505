"""Seeded, bounded fuzzing of what users hand vlkit: recipes, manifests (with their images) and adapter
directories. Every mutation either loads or fails with an error the CLI's one table maps to exit 2
(`vlkit.cli.app.exit_code`), never exit 1, and no file is changed by reading it."""
from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import pytest

from vlkit.cli.app import error_message, exit_code

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _fresh_plugins():
    """These tests hide installed plugins (VLKIT_PLUGINS=""): the cached plugin system must not outlive them."""
    from vlkit.plugins import reset_plugins

    reset_plugins()
    yield
    reset_plugins()
GARBAGE = ["", "-1", "nan", "inf", "[1, 2", "{a: }", "???", "${oc.env:HOME}", "${nope}", "99999999999999999999",
           "null", "true", "[]", "{}", "'unterminated", "\x00", "é", "1e309", "-0", "0", "foo: bar: baz",
           "${oc.decode:1}", "tiny@/no/such.safetensors", "hf:/no/such", "open_clip:NoModel"]


def tree(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def outcome(fn) -> int:
    """0 when `fn` runs, else the CLI exit code of its exception (1 = a bug)."""
    try:
        fn()
    except SystemExit:
        raise
    except BaseException as exc:  # noqa: BLE001 - the point is to see every kind
        code = exit_code(exc)
        if code != 2:
            raise AssertionError(f"exit {code}: {error_message(exc)}") from exc
        assert len(error_message(exc).splitlines()) == 1
        return 2
    return 0


def mutate_text(text: str, rng: random.Random) -> str:
    lines = text.splitlines()
    op = rng.randrange(6)
    i = rng.randrange(len(lines)) if lines else 0
    if op == 0 and lines:  # drop a line
        del lines[i]
    elif op == 1 and lines:  # a value becomes garbage
        head, sep, _ = lines[i].partition(":")
        lines[i] = f"{head}{sep or ':'} {rng.choice(GARBAGE)}"
    elif op == 2 and lines:  # duplicate a line
        lines.insert(i, lines[i])
    elif op == 3:  # truncate
        return text[: rng.randrange(len(text) + 1)]
    elif op == 4:  # flip bytes
        b = bytearray(text.encode())
        for _ in range(rng.randint(1, 4)):
            if b:
                b[rng.randrange(len(b))] = rng.randrange(256)
        return b.decode("utf-8", errors="replace")
    else:  # indent a line: changes nesting
        if lines:
            lines[i] = "  " * rng.randint(1, 3) + lines[i]
    return "\n".join(lines) + "\n"


def mutate_bytes(data: bytes, rng: random.Random) -> bytes:
    b = bytearray(data)
    op = rng.randrange(4)
    if op == 0 and b:
        for _ in range(rng.randint(1, 8)):
            b[rng.randrange(len(b))] = rng.randrange(256)
    elif op == 1:
        b = b[: rng.randrange(len(b) + 1)]
    elif op == 2:
        b = b + bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))
    else:
        b = bytearray(rng.randrange(256) for _ in range(rng.randint(0, 64)))
    return bytes(b)


def test_fuzz_recipes(tmp_path, monkeypatch):
    from vlkit.train.recipe import load_recipe

    monkeypatch.setenv("VLKIT_PLUGINS", "")
    rng = random.Random(1234)
    sources = sorted((ROOT / "recipes").glob("*.yaml"))
    snapshot = tree(ROOT / "recipes")
    seen = {0: 0, 2: 0}
    for case in range(160):
        src = rng.choice(sources)
        text = src.read_text(encoding="utf-8")
        for _ in range(rng.randint(1, 3)):
            text = mutate_text(text, rng)
        path = tmp_path / f"case{case}.yaml"
        path.write_text(text, encoding="utf-8", errors="replace")
        before = tree(tmp_path)
        seen[outcome(lambda: load_recipe(path, []))] += 1
        assert tree(tmp_path) == before
    assert tree(ROOT / "recipes") == snapshot
    assert seen[2] > 20  # the mutations do reach the checks


@pytest.fixture(scope="module")
def manifest_dir(tmp_path_factory):
    from PIL import Image

    d = tmp_path_factory.mktemp("manifest")
    (d / "images").mkdir()
    rows = []
    for i in range(6):
        Image.new("RGB", (24, 24), (40 * i, 80, 200 - 30 * i)).save(d / "images" / f"{i}.png")
        rows.append({"image": f"images/{i}.png", "caption": f"a picture number {i}", "label": i % 2,
                     "expression": "the square", "box": [0.1, 0.1, 0.5, 0.6]})
    (d / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d


def test_fuzz_manifests(manifest_dir, tmp_path, monkeypatch):
    import shutil

    import vlkit
    from vlkit.data import load_data
    from vlkit.data.pipeline import materialize
    from vlkit.plugins import registry

    monkeypatch.setenv("VLKIT_PLUGINS", "")
    bb = vlkit.load_backbone("tiny@random")
    rng = random.Random(99)
    seen = {0: 0, 2: 0}
    for case in range(70):
        d = tmp_path / f"c{case}"
        shutil.copytree(manifest_dir, d)
        m = d / "m.jsonl"
        if rng.random() < 0.5:
            m.write_bytes(mutate_bytes(m.read_bytes(), rng) if rng.random() < 0.5
                          else mutate_text(m.read_text(), rng).encode())
        else:
            png = d / "images" / f"{rng.randrange(6)}.png"
            png.write_bytes(mutate_bytes(png.read_bytes(), rng))
        task_name = rng.choice(["retrieval", "classification", "grounding"])
        before = tree(d)

        def run():
            ds = load_data({"kind": "manifest", "path": str(m), "task": task_name})
            task = registry("task").get(task_name)(bb, ds, **({"class_names": ["a", "b"]}
                                                             if task_name == "classification" else {}))
            materialize(task.prepare(bb, ds))

        seen[outcome(run)] += 1
        assert tree(d) == before
    assert seen[0] > 3 and seen[2] > 10


def test_fuzz_adapter_files(tmp_path, monkeypatch):
    import shutil

    import vlkit

    monkeypatch.setenv("VLKIT_PLUGINS", "")
    bb = vlkit.load_backbone("tiny@random")
    good = tmp_path / "good"
    vlkit.inject(bb, "lora", name="a")
    vlkit.save_adapter(bb, good, name="a")
    rng = random.Random(7)
    seen = {0: 0, 2: 0}
    for case in range(80):
        d = tmp_path / f"c{case}"
        shutil.copytree(good, d)
        target = d / rng.choice(["adapter_config.json", "adapter_model.safetensors"])
        if target.suffix == ".json" and rng.random() < 0.6:
            cfg = json.loads(target.read_text())
            key = rng.choice(sorted(cfg))
            cfg[key] = rng.choice([None, "x", -1, [], {}, 1e309 if False else 3.5, {"a": 1}])
            target.write_text(json.dumps(cfg))
        else:
            target.write_bytes(mutate_bytes(target.read_bytes(), rng))
        before = tree(d)
        fresh = vlkit.load_backbone("tiny@random")
        seen[outcome(lambda: vlkit.load_adapter(fresh, d, name="x"))] += 1
        assert tree(d) == before
    assert seen[2] > 30
