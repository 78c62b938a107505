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


# --- the server, PEFT directories, webdataset shards, CoOp folders (issue 27) ----------------------------------
HOSTILE = ["[" * 5000 + "]" * 5000, "9" * 5000, "1e999", "-0", "\ud800", "{}", "{x}", "{", "}", "auto", "none",
           "~", "~root/x", "../..", "/", "\x00", "a" * 5000, "", " ", "é", "NaN", "null", "true", "[]", "{{}}"]


def _hostile_value(rng: random.Random):
    pick = rng.randrange(8)
    if pick == 0:
        return rng.choice(HOSTILE)
    if pick == 1:
        return rng.choice([None, True, -1, 0, 10**30, 2.5, float("inf"), [], {}, [[[]]], {"a": {"b": []}}])
    if pick == 2:
        return [rng.choice(HOSTILE) for _ in range(rng.randint(0, 4))]
    if pick == 3:
        return rng.randint(-(10**6), 10**6)
    return "".join(chr(rng.randrange(32, 0x2FFF)) for _ in range(rng.randint(0, 12)))


def test_fuzz_server(tmp_path, monkeypatch):
    """Seeded mutations of valid requests to every endpoint: never a 5xx, every body JSON, the server still up."""
    import base64
    import io

    from fastapi.testclient import TestClient
    from PIL import Image

    from vlkit.serve import ServeConfig, create_app

    monkeypatch.setenv("VLKIT_PLUGINS", "")
    import vlkit

    bb = vlkit.load_backbone("tiny@random")
    vlkit.inject(bb, "lora", name="a", rank=2)
    vlkit.save_adapter(bb, tmp_path / "root" / "a", name="a")
    buf = io.BytesIO()
    Image.new("RGB", (20, 20), (10, 200, 30)).save(buf, "PNG")
    img = base64.b64encode(buf.getvalue()).decode()
    valid = {"/v1/embed": {"adapter": "a", "text": "a red circle"},
             "/v1/classify": {"adapter": "a", "image": img, "labels": ["x", "y"], "prompt": "a {}", "top": 1},
             "/v1/score": {"adapter": None, "image": img, "texts": ["a", "b"]},
             "/v1/answer": {"adapter": "a", "image": img, "question": "what", "top": 2},
             "/v1/adapters/b": {"path": "a"}}
    app = create_app(ServeConfig(backbone="tiny@random", adapters=[str(tmp_path / "root" / "a")],
                                 adapter_root=str(tmp_path / "root"), max_wait_ms=0))
    rng = random.Random(2027)
    statuses: dict[int, int] = {}
    with TestClient(app, raise_server_exceptions=True) as client:
        for _ in range(150):
            path = rng.choice(sorted(valid))
            body = json.loads(json.dumps(valid[path]))
            op = rng.randrange(4)
            if op == 0:  # a field gets a hostile value
                body[rng.choice(sorted(body) + ["extra"])] = _hostile_value(rng)
                raw = json.dumps(body).encode()
            elif op == 1:  # a field goes
                body.pop(rng.choice(sorted(body)))
                raw = json.dumps(body).encode()
            elif op == 2:  # the bytes are mutated
                raw = mutate_bytes(json.dumps(body).encode(), rng)
            else:  # the text is mutated
                raw = mutate_text(json.dumps(body, indent=1), rng).encode("utf-8", "surrogatepass")
            ctype = rng.choice(["application/json"] * 6 + ["text/plain", "application/x-www-form-urlencoded", ""])
            r = client.request(rng.choice(["POST"] * 9 + ["DELETE"]), path, content=raw,
                               headers={"content-type": ctype} if ctype else {})
            statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
            assert r.status_code < 500, (path, raw[:200], r.status_code, r.text)
            if r.status_code >= 400:
                assert set(r.json()) == {"error"} and "\n" not in r.json()["error"]
        assert client.get("/health").json()["status"] == "ok"
        assert client.post("/v1/embed", json=valid["/v1/embed"]).status_code == 200
    assert sum(v for k, v in statuses.items() if 400 <= k < 500) > 50 and statuses.get(200, 0) + statuses.get(201, 0) > 3


def test_fuzz_peft_dirs(hf_clip_dir, tmp_path, monkeypatch):
    import shutil

    peft = pytest.importorskip("peft")
    from transformers import CLIPModel

    import vlkit

    monkeypatch.setenv("VLKIT_PLUGINS", "")
    good = tmp_path / "good"
    model = peft.get_peft_model(CLIPModel.from_pretrained(hf_clip_dir).eval(),
                                peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "fc1"]))
    model.save_pretrained(str(good))
    keys = ["r", "lora_alpha", "lora_dropout", "use_dora", "use_rslora", "rank_pattern", "alpha_pattern",
            "peft_type", "target_modules", "bias", "modules_to_save", "fan_in_fan_out", "base_model_name_or_path"]
    rng = random.Random(16)
    seen = {0: 0, 2: 0}
    for case in range(30):
        d = tmp_path / f"c{case}"
        shutil.copytree(good, d)
        cfg_file, weights = d / "adapter_config.json", d / "adapter_model.safetensors"
        if rng.random() < 0.7:
            cfg = json.loads(cfg_file.read_text())
            for _ in range(rng.randint(1, 2)):
                cfg[rng.choice(keys)] = _hostile_value(rng) if rng.random() < 0.8 else {"q_proj": _hostile_value(rng)}
            cfg_file.write_text(json.dumps(cfg))
        elif rng.random() < 0.5:
            cfg_file.write_bytes(mutate_bytes(cfg_file.read_bytes(), rng))
        else:
            weights.write_bytes(mutate_bytes(weights.read_bytes(), rng))
        before = tree(d)
        seen[outcome(lambda: vlkit.load_adapter(vlkit.load_backbone(f"hf:{hf_clip_dir}"), d))] += 1
        assert tree(d) == before
    assert seen[2] > 12


def _shard_bytes(rng: random.Random, n: int) -> bytes:
    import io
    import tarfile

    from PIL import Image

    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tf:
        for i in range(n):
            png = io.BytesIO()
            Image.new("RGB", (12, 12), (rng.randrange(256), 40, 90)).save(png, "PNG")
            meta = json.dumps({"caption": f"sample {i}", "label": i % 2}).encode()
            for ext, payload in (("png", png.getvalue()), ("json", meta), ("cls", str(i % 2).encode())):
                info = tarfile.TarInfo(f"{i:04d}.{ext}")
                info.size = len(payload)
                tf.addfile(info, io.BytesIO(payload))
    return out.getvalue()


def test_fuzz_webdataset_shards(tmp_path, monkeypatch):
    """Shards with mutated bytes, cut short, or a member replaced: load and decode every row, or one line."""
    from vlkit.data import load_data
    from vlkit.data.images import ImageReader

    monkeypatch.setenv("VLKIT_PLUGINS", "")
    rng = random.Random(31)
    seen = {0: 0, 2: 0}
    for case in range(40):
        shard = tmp_path / f"s{case}.tar"
        data = _shard_bytes(rng, 4)
        if rng.random() < 0.6:
            data = mutate_bytes(data, rng)
        shard.write_bytes(data)
        spec = {"kind": "webdataset", "shards": str(shard) if rng.random() < 0.8 else [str(shard), _hostile_value(rng)],
                "task": rng.choice(["classification", "retrieval"])}

        def run():
            ds = load_data(spec)
            ImageReader(ds, "image", "fuzz").read(list(range(len(ds))))

        seen[outcome(run)] += 1
    assert seen[0] > 3 and seen[2] > 10


def test_fuzz_coop_folders(tmp_path, monkeypatch):
    """CoOp folders (split_zhou_X.json + images) with mutated split files and images: loads or one line."""
    import shutil

    from PIL import Image

    from vlkit.data import load_data
    from vlkit.data.images import ImageReader

    monkeypatch.setenv("VLKIT_PLUGINS", "")
    good = tmp_path / "good"
    (good / "images").mkdir(parents=True)
    table: dict[str, list] = {"train": [], "val": [], "test": []}
    for i in range(9):
        Image.new("RGB", (12, 12), (i * 25, 90, 40)).save(good / "images" / f"{i}.png")
        table[("train", "val", "test")[i % 3]].append([f"{i}.png", i % 3, ["cat", "dog", "fox"][i % 3]])
    (good / "split_zhou_Pets.json").write_text(json.dumps(table))
    rng = random.Random(8)
    seen = {0: 0, 2: 0}
    for case in range(40):
        d = tmp_path / f"c{case}"
        shutil.copytree(good, d)
        split = d / "split_zhou_Pets.json"
        op = rng.randrange(4)
        if op == 0:
            split.write_text(mutate_text(split.read_text(), rng), errors="replace")
        elif op == 1:
            t = json.loads(split.read_text())
            part = rng.choice(["train", "val", "test"])
            if t[part] and rng.random() < 0.7:
                t[part][rng.randrange(len(t[part]))][rng.randrange(3)] = _hostile_value(rng)
            else:
                t[part] = _hostile_value(rng)
            split.write_text(json.dumps(t))
        elif op == 2:
            png = d / "images" / f"{rng.randrange(9)}.png"
            png.write_bytes(mutate_bytes(png.read_bytes(), rng))
        options = {"split": rng.choice(["train", "val", "test", None])}
        if op == 3:
            options[rng.choice(["shots", "seed", "image_dir", "name", "split"])] = _hostile_value(rng)

        def run():
            ds = load_data({"kind": "coop", "source": str(d), **options})
            ImageReader(ds, "image", "fuzz").read(list(range(len(ds))))

        before = tree(d)
        seen[outcome(run)] += 1
        assert tree(d) == before
    assert seen[0] > 3 and seen[2] > 10
