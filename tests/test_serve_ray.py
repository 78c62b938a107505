"""`vlkit serve --cluster ray`: the plan of units and one replica's core without Ray (answers equal the
single-process server's, units loaded and evicted cleanly, a unit never dropped under an admitted request), then
Ray Serve for real on a local instance on loopback only (2 replicas, adapters loaded on demand and requests routed
to the replica that holds theirs, the same answers and errors as the single-process server, hot load with LRU
eviction), and the CLI: flags, no Ray installed (one line, exit 2), and a `--cluster ray` process stopped by SIGTERM."""
from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

from test_serve import CLASSES, ROOT, SPEC, InProcess, b64, world  # noqa: F401 - world is a fixture
from vlkit.adapters.model import AdaptedModel

httpx = pytest.importorskip("httpx")


def comparable(got: dict, want: dict) -> None:
    """Two answers of the same request are the same up to float tolerance."""
    assert set(got) == set(want), (got, want)
    for k, v in want.items():
        if k == "embedding":
            torch.testing.assert_close(torch.tensor(got[k]), torch.tensor(v), rtol=1e-5, atol=1e-5)
        elif k == "scores" and isinstance(v, dict):
            assert set(got[k]) == set(v) and all(abs(got[k][x] - v[x]) <= 2e-4 for x in v), (got, want)
        elif k == "scores":
            assert len(got[k]) == len(v) and all(abs(a - b) <= 2e-4 for a, b in zip(got[k], v)), (got, want)
        elif k == "top":
            assert [t.get("class", t.get("answer")) for t in got[k]] == [t.get("class", t.get("answer")) for t in v]
        else:
            assert got[k] == v, (k, got, want)


def requests_for(world) -> list[tuple[str, dict]]:
    img0, img1 = b64(world["images"][0]), b64(world["images"][1])
    return [
        ("/v1/classify", {"adapter": "cls", "image": img0}),  # the route composition's unit
        ("/v1/embed", {"adapter": "extra", "image": img1}),  # an adapter on its own
        ("/v1/classify", {"adapter": "extra", "image": img0, "top": 2}),
        ("/v1/embed", {"adapter": None, "text": "a red circle"}),  # the frozen backbone: any replica
        ("/v1/embed", {"adapter": "cls", "text": "a red circle"}),
        ("/v1/score", {"adapter": "plain", "image": img1, "texts": ["a star", "two crosses"]}),
        ("/v1/answer", {"adapter": "vqa", "image": img0, "question": "what colour is the circle"}),
        ("/v1/classify", {"adapter": "auto", "image": img1, "labels": CLASSES}),  # the router picks
        ("/v1/embed", {"adapter": "auto", "image": img0}),
    ]


@pytest.fixture(scope="module")
def items(world):
    return [str(world["comp"]), str(world["extra"])]


@pytest.fixture(scope="module")
def single(world, items):
    """The single-process server on the same --adapters: the reference answers."""
    s = InProcess(backbone=SPEC, adapters=items, max_batch=8, max_wait_ms=5)
    yield s
    s.close()


# --- no Ray: the plan and one replica --------------------------------------------------------------
def test_plan_names_units_like_the_single_process_server(world, items):
    from vlkit.errors import AdapterFileError, RequestError
    from vlkit.serve.cluster import Directory

    d = Directory.from_items(items)
    assert d.names() == ["cls", "vqa", "plain", "extra"]
    route, extra = d.unit_for("cls"), d.unit_for("extra")
    assert route.kind == "route" and route.auto and d.unit_for("auto") is route and d.unit_for("vqa") is route
    assert extra.kind == "adapter" and extra.id != route.id and d.unit_for(None) is None
    assert d.router()["routes_to"] == ["cls", "vqa", "plain", "none"]
    assert route.info["cls"]["labels"] == CLASSES and route.info["vqa"]["task"] == "vqa"
    with pytest.raises(RequestError) as e:
        d.unit_for("nope")
    assert e.value.status == 404 and "loaded: cls, extra, plain, vqa" in str(e.value)
    # a name taken before the composition is made unique as the single-process server does (cls -> cls_2)
    clash = Directory.from_items([str(world["cls"]), str(world["comp"])])
    assert clash.names() == ["cls", "cls_2", "vqa", "plain"]
    assert Directory.from_items([f"x={world['extra']}"]).names() == ["x"]
    with pytest.raises(AdapterFileError):
        Directory.from_items([str(world["tmp"] / "missing")])
    with pytest.raises(RequestError) as e:
        d.remove("cls")
    assert e.value.status == 409
    assert d.remove("extra").id == extra.id and d.names() == ["cls", "vqa", "plain"]
    assert d.plan_adapter("extra", str(world["extra"])).id not in (route.id, extra.id)


def test_replica_core_loads_and_evicts_units_with_single_process_answers(world, items, single):
    """What a replica runs, driven by hand as Ray's multiplexer would with one unit per replica: every answer
    equals the single-process server's, an evicted unit leaves nothing on the backbone, and eviction waits for the
    requests that were admitted for the unit."""
    from vlkit.serve.app import ServeConfig
    from vlkit.serve.cluster import Directory, ReplicaCore
    from vlkit.serve.inputs import adapter_of

    d = Directory.from_items(items)
    core = ReplicaCore(ServeConfig(backbone=SPEC, max_wait_ms=1, drain_timeout=10), SPEC, tag="r0")
    held: dict = {}

    async def get(unit):  # Ray's multiplexer with max_num_models_per_replica=1, without Ray
        if unit.id not in held:
            for old in list(held):
                held.pop(old).__del__()
            held[unit.id] = await asyncio.get_running_loop().run_in_executor(None, core.load, unit)
        return held[unit.id]

    async def ask(path, body):
        unit = d.unit_for(adapter_of(body.get("adapter")))
        return await core.reply(path.rsplit("/", 1)[1], body, None, (lambda: get(unit)) if unit else None)

    bb = core.backend.catalog.backbone
    try:
        for path, body in requests_for(world) + requests_for(world)[:3]:  # units come and go, answers stay
            reply = asyncio.run(ask(path, body))
            assert "result" in reply, reply
            comparable(reply["result"], single.client.post(path, json=body).json())
            unit = d.unit_for(adapter_of(body.get("adapter")))
            if unit is not None:  # only the unit in use is on the backbone
                assert set(AdaptedModel.of(bb).records) == set(unit.served) == set(reply["report"]["held"][unit.id])
        assert reply["report"]["loads"] >= 4 and reply["report"]["unloads"] >= 3
        bad = asyncio.run(ask("/v1/classify", {"adapter": "vqa", "image": b64(world["images"][0])}))
        assert bad["status"] == 400 and "\n" not in bad["error"]
        # an admitted request keeps its unit: the eviction waits for it
        extra = d.unit_for("extra")
        lu = asyncio.run(core._acquire(lambda: get(extra)))
        evict = threading.Thread(target=lu.__del__)
        evict.start()
        time.sleep(0.3)
        assert evict.is_alive() and "extra" in AdaptedModel.of(bb).records
        core._release(lu)
        evict.join(10)
        assert not evict.is_alive() and not AdaptedModel.of(bb).records and core.backend.catalog.router is None
    finally:
        core.close(10)


# --- Ray Serve on a local instance on loopback -----------------------------------------------------------
def _listening_ports(pids: set[int]) -> list[str]:
    """Local addresses that processes `pids` listen on (from /proc, IPv4 and IPv6)."""
    inodes = set()
    for pid in pids:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
        except OSError:
            continue
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                cols = line.split()
                if cols[3] == "0A" and cols[9] in inodes:  # LISTEN
                    found.append(cols[1])
    return found


def _is_loopback(hex_addr: str) -> bool:
    ip = hex_addr.split(":")[0]
    if len(ip) == 8:
        return ip.endswith("7F")  # 127.x.x.x, little-endian
    return ip in ("00000000000000000000000001000000", "0000000000000000FFFF00000100007F")  # ::1, ::ffff:127.0.0.1


def _ray_pids() -> set[int]:
    out = set()
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    cmd = f.read().decode(errors="replace")
            except OSError:
                continue
            if "ray" in cmd and ("gcs_server" in cmd or "raylet" in cmd or "ray::" in cmd or "ray/_private" in cmd
                                 or "ray/dashboard" in cmd):
                out.add(int(pid))
    return out


@pytest.mark.slow
def test_ray_serve_multiplexes_adapters_across_replicas(world, items, single):
    ray = pytest.importorskip("ray")
    pytest.importorskip("ray.serve")
    from vlkit.serve.app import ServeConfig
    from vlkit.serve.ray_app import REPLICA_HEADER, deploy, start_local_ray

    t0 = time.time()
    start_local_ray(num_cpus=2, log_to_driver=False)
    dep = None
    try:
        dep = deploy(ServeConfig(backbone=SPEC, adapters=items, cluster="ray", replicas=2, cpus_per_replica=0.5,
                                 max_adapters_per_replica=1, max_wait_ms=5, port=0))
        started = time.time() - t0
        assert dep.url.startswith("http://127.0.0.1:")
        ours = _ray_pids()
        assert ours and all(_is_loopback(a) for a in _listening_ports(ours)), _listening_ports(ours)
        c = httpx.Client(base_url=dep.url, timeout=120)
        h = c.get("/health").json()
        assert h["status"] == "ok" and h["cluster"] == "ray" and h["replicas"] == 2 and h["adapters"] == 4
        listed = c.get("/v1/adapters").json()
        assert [a["name"] for a in listed["adapters"]] == ["cls", "vqa", "plain", "extra"]
        assert listed["router"]["routes_to"] == ["cls", "vqa", "plain", "none"]
        assert all(a["replicas"] == [] for a in listed["adapters"])  # nothing loaded before a request needs it

        # the first request for each unit loads it on a replica; Ray then routes its requests there
        first = c.post("/v1/classify", json={"adapter": "cls", "image": b64(world["images"][0])})
        assert first.status_code == 200, first.text
        time.sleep(1.0)  # the replica reports its model ids to the router (every 0.1 s)
        second = c.post("/v1/embed", json={"adapter": "extra", "text": "a cross"})
        assert second.status_code == 200 and second.headers[REPLICA_HEADER] != first.headers[REPLICA_HEADER]
        time.sleep(1.0)
        served_by: dict[str, set] = {}
        for _ in range(2):
            for path, body in requests_for(world):
                r = c.post(path, json=body)
                assert r.status_code == 200, (path, body.get("adapter"), r.text)
                comparable(r.json(), single.client.post(path, json=body).json())
                served_by.setdefault(str(body.get("adapter")), set()).add(r.headers[REPLICA_HEADER])
        cl = c.get("/v1/adapters").json()["cluster"]
        holder = {"cls": first.headers[REPLICA_HEADER], "extra": second.headers[REPLICA_HEADER]}
        assert cl["held"] == {holder["cls"]: ["cls", "plain", "vqa"], holder["extra"]: ["extra"]}, cl
        assert cl["loads"] == {holder["cls"]: 1, holder["extra"]: 1} and sum(cl["unloads"].values()) == 0, cl
        for name in ("cls", "vqa", "plain", "auto"):  # one unit: every request went to the replica holding it
            assert served_by[name] == {holder["cls"]}, (name, served_by)
        assert served_by["extra"] == {holder["extra"]}
        mp = c.post("/v1/classify", files={"image": ("x.png", world["images"][2], "image/png")}, data={"adapter": "extra"})
        assert mp.status_code == 200 and mp.json() == c.post("/v1/classify", json={
            "adapter": "extra", "image": b64(world["images"][2])}).json()
        entries = {a["name"]: a for a in c.get("/v1/adapters").json()["adapters"]}
        assert entries["extra"]["replicas"] == [holder["extra"]] and entries["cls"]["parameters"] > 0
        m = c.get("/metrics").text
        assert f'vlkit_replica_unit_loads_total{{replica="{holder["extra"]}"}} 1' in m
        assert 'vlkit_requests_total{endpoint="/v1/classify",status="200"}' in m

        # bad requests: 4xx with one line, from the ingress and from a replica, and the cluster stays up
        img = b64(world["images"][1])
        bad = {"malformed": (dict(content=b'{"adapter": ', headers={"content-type": "application/json"}), 400),
               "unknown-adapter": (dict(json={"adapter": "nope", "image": img}), 404),
               "unknown-field": (dict(json={"adapter": "cls", "img": img}), 422),
               "not-image": (dict(json={"adapter": "extra", "image": b64(b"GIF89a not an image")}), 400),
               "wrong-task": (dict(json={"adapter": "vqa", "image": img}), 400),
               "media-type": (dict(content=b"x", headers={"content-type": "text/plain"}), 415)}
        for kind, (req, status) in bad.items():
            r = c.post("/v1/classify", **req)
            assert r.status_code == status and list(r.json()) == ["error"] and "\n" not in r.json()["error"], kind
            assert r.json() == single.client.post("/v1/classify", **req).json(), kind

        # hot load: a third unit, loaded on demand; with one unit per replica the least recently used one goes
        solo = {"path": str(world["plain"])}
        r = c.post("/v1/adapters/solo", json=solo)
        assert r.status_code == 201 and r.json()["name"] == "solo" and len(r.json()["replicas"]) == 1, r.text
        assert single.client.post("/v1/adapters/solo", json=solo).status_code == 201
        assert c.post("/v1/adapters/solo", json=solo).status_code == 409
        assert c.post("/v1/adapters/broken", json={"path": str(world["corrupt"])}).status_code == 422
        for path, body in [("/v1/embed", {"adapter": "solo", "image": img})] + requests_for(world)[:3]:
            r = c.post(path, json=body)
            assert r.status_code == 200, r.text
            comparable(r.json(), single.client.post(path, json=body).json())
        cl = c.get("/v1/adapters").json()["cluster"]
        held = [int(line.rsplit(" ", 1)[1]) for line in c.get("/metrics").text.splitlines()
                if line.startswith("vlkit_replica_units_held{")]
        assert sum(cl["unloads"].values()) >= 1 and len(held) == 2 and max(held) == 1, (cl, held)
        assert c.delete("/v1/adapters/solo").json() == {"unloaded": "solo"}
        assert c.post("/v1/embed", json={"adapter": "solo", "text": "x"}).status_code == 404
        assert c.delete("/v1/adapters/cls").status_code == 409
        single.client.delete("/v1/adapters/solo")
        print(f"\nray: started in {started:.1f}s, whole test {time.time() - t0:.1f}s")
    finally:
        if dep is not None:
            dep.shutdown()
        ray.shutdown()


@pytest.mark.slow
@pytest.mark.parametrize("to", ["process", "group"])
def test_cli_cluster_ray_serves_until_sigterm(world, to):
    """`vlkit serve --cluster ray` starts its own Ray instance on 127.0.0.1, prints its URL, serves, and on
    SIGTERM (to the process, or to its whole process group as a terminal's Ctrl-C or a container stop does, Ray's
    own processes included) shuts Serve and Ray down and exits 0, never SIGABRT."""
    pytest.importorskip("ray")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-m", "vlkit", "serve", "--cluster", "ray", "--replicas", "1",
                             "--cpus-per-replica", "0.5", "--backbone", SPEC, "--adapters", str(world["extra"]),
                             "--port", "0"], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        url, lines, t0 = None, [], time.time()
        while time.time() - t0 < 240 and url is None:
            line = proc.stderr.readline()
            if not line and proc.poll() is not None:
                break
            lines.append(line)
            if line.startswith("vlkit serve:") and "http://" in line:
                url = line.split(" on ")[1].split(" ")[0]
        assert url and url.startswith("http://127.0.0.1:"), "".join(lines)
        threading.Thread(target=proc.stderr.read, daemon=True).start()
        assert httpx.get(url + "/health", timeout=60).json()["cluster"] == "ray"
        r = httpx.post(url + "/v1/embed", json={"adapter": "extra", "text": "a star"}, timeout=120)
        assert r.status_code == 200 and len(r.json()["embedding"]) == 128
        if to == "group":
            os.killpg(proc.pid, signal.SIGTERM)
        else:
            proc.send_signal(signal.SIGTERM)
        assert proc.wait(120) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


# --- the CLI without Ray -------------------------------------------------------------------------------
def test_cli_cluster_flags_and_no_ray_installed(world, capsys, monkeypatch):
    from cli_helpers import cli

    code, _, err = cli(["serve", "--backbone", SPEC, "--cluster", "k8s"], capsys)
    assert code == 2 and "--cluster must be none or ray" in err and err.count("\n") == 1
    code, _, err = cli(["serve", "--engine", "onnx", "--adapters", str(world["extra"]), "--cluster", "ray"], capsys)
    assert code == 2 and "torch engine" in err and err.count("\n") == 1
    code, _, err = cli(["serve", "--backbone", SPEC, "--cluster", "ray", "--replicas", "0"], capsys)
    assert code == 2 and "--replicas" in err
    for mod in [m for m in sys.modules if m == "ray" or m.startswith("ray.")]:
        monkeypatch.delitem(sys.modules, mod)
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError: as if not installed
    code, out, err = cli(["serve", "--backbone", SPEC, "--adapters", str(world["extra"]), "--cluster", "ray"], capsys)
    assert code == 2 and out == "" and err.count("\n") == 1, err
    assert err.startswith("error: --cluster ray needs Ray Serve") and "pip install 'vlkit[cluster]'" in err
