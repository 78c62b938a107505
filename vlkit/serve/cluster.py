"""`vlkit serve --cluster ray`, the parts that need no Ray: the plan of what replicas load, and one replica's core.

A *unit* is one `--adapters` item (or one hot-loaded adapter directory): an adapter, a route composition (its
adapters and its router, which answers `auto`) or another composition (served as one name). A unit is what a
replica loads on demand: its id is the Ray Serve multiplexed model id, so every request for one of its names goes
to a replica that holds it (`vlkit.serve.ray_app`). Names are fixed when the plan is made (`plan_units`), from the
files alone, so a replica serves a unit under the same names whatever else it holds: adapters keep their names
(made unique as the single-process server does), route compositions' adapters theirs, and the adapters inside other
compositions get private names (`LABEL-NAME`) that no served name can take.

`ReplicaCore` is what one replica runs: one frozen backbone, its batching engine (`vlkit.serve.engine`), and the
units it holds (`load` / `unload`, run between batches; a unit is dropped only once its requests are answered).
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..adapters.files import read_adapter_config
from ..adapters.model import AdaptedModel
from ..backbones.state import check_adapter_name
from ..compose.adapter_fusion import remove_fusion
from ..compose.composition import activation, adapter_entries, is_composition, read_composition
from ..compose.resolve import AdapterResolver, free_name
from ..errors import AdapterFileError, ConfigError, OverloadedError, RequestError
from ..plugins import registry
from .app import build_item, error_text, http_status
from .backends import TorchBackend
from .catalog import name_and_path
from .engine import BatchingEngine
from .generate_api import OP as GENERATE
from .generate_api import GenerateBody
from .guards import RESERVED_NAMES, check_served_name
from .inputs import AUTO, BODIES, validate

ADAPTER_CONFIG = "adapter_config.json"


@dataclass
class Unit:
    """One thing a replica loads: its served names and, for compositions, the backbone name of each adapter."""

    id: str
    kind: str  # adapter | route | composition
    source: str  # absolute directory
    label: str  # adapter / composition: the served name; route: the composition's label
    served: list[str]
    names: dict[str, str] = field(default_factory=dict)  # resolved adapter directory -> name on the backbone
    auto: bool = False  # its router answers 'auto'
    router: list[str | None] | None = None  # the names its router routes to
    info: dict[str, dict[str, Any]] = field(default_factory=dict)  # served name -> description from the files


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AdapterFileError(f"{path} is not valid JSON: {exc}") from None


def _task_info(d: Path | None) -> tuple[str | None, list[str] | None]:
    """(task name, class labels) from a directory's task.json, without loading the head."""
    if d is None or not (d / "task.json").is_file():
        return None, None
    meta = _read_json(d / "task.json")
    if not isinstance(meta, dict):
        return None, None
    labels = (meta.get("options") or {}).get("class_names")
    return meta.get("name"), list(labels) if isinstance(labels, list) and labels else None


def _adapter_info(name: str, source: Path, cfg: dict, member_of: str | None = None) -> dict[str, Any]:

    variants = registry("adapter")
    var = variants.get(cfg["variant"]) if cfg["variant"] in variants else None
    task, labels = _task_info(source)
    out = {
        "name": name,
        "kind": "adapter",
        "source": str(source),
        "variant": cfg["variant"],
        "task": task,
        "parameters": None,
        "joint": bool(var is not None and var.joint),
    }
    if member_of:
        out["composition"] = member_of
    if labels:
        out["labels"] = labels
    return out


def split_items(items) -> list[str]:
    if isinstance(items, str):
        return [p.strip() for p in items.split(",") if p.strip()]
    return [str(x) for x in items or []]


def plan_units(
    items,
    *,
    first_id: int = 0,
    taken: set[str] | None = None,
    auto: bool = False,
    adapters_only: bool = False,
    name: str | None = None,
) -> list[Unit]:
    """The units of `--adapters` items (a comma-separated string or a list), from their files alone.

    `taken`: names already used (served or private; updated); `auto`: whether a unit already answers 'auto';
    `adapters_only` and `name`: a hot load (one adapter directory, served as `name`)."""

    taken = set() if taken is None else taken
    units: list[Unit] = []
    for k, text in enumerate(split_items(items)):
        given, path = name_and_path(text)
        given = name or given
        if given is not None:
            check_served_name(check_adapter_name(given))
            if given in taken:
                raise RequestError(f"an adapter named {given!r} is already loaded; unload it first", status=409)
        if not path.exists():
            raise AdapterFileError(f"adapter {text!r} not found: not a directory, nor a run under runs/")
        path = path.resolve()
        uid = f"u{first_id + k}"
        if (path / ADAPTER_CONFIG).is_file():
            cfg = read_adapter_config(path)
            served = given or free_name(taken | set(RESERVED_NAMES), str(cfg.get("name") or path.name))
            taken.add(served)
            described = {served: _adapter_info(served, path, cfg)}
            units.append(Unit(uid, "adapter", str(path), served, [served], info=described))
            continue
        if adapters_only or not is_composition(path):
            raise AdapterFileError(
                f"{path} is not an adapter directory (no {ADAPTER_CONFIG})"
                + ("" if adapters_only else " nor a composition directory")
            )
        spec = read_composition(path)
        mode = spec.get("mode", "stack")
        label = given or free_name((taken if mode != "route" else set()) | set(RESERVED_NAMES), path.name)
        if mode != "route":
            taken.add(label)
        names: dict[str, str] = {}
        members: list[tuple[str, Path, dict]] = []
        aliases: dict[str | None, str] = {}
        for e in adapter_entries(path, spec):
            if e["path"] is None:
                raise ConfigError(
                    f"composition {path} names the adapter {e.get('name')!r} without a directory; "
                    "a server loads adapters from directories"
                )
            p = Path(e["path"]).resolve()
            key = str(p)
            if key in names:
                raise ConfigError(f"composition {path} lists the same adapter twice")
            cfg = read_adapter_config(p)
            wanted = str(e.get("name") or cfg.get("name") or p.name)
            n = free_name(taken, wanted if mode == "route" else f"{label}-{wanted}")
            taken.add(n)
            names[key] = n
            aliases[e.get("name")] = n
            members.append((n, p, cfg))
        if mode == "route":
            entry = spec.get("router") or None
            router = None
            if isinstance(entry, dict) and isinstance(entry.get("names"), list):
                router = [aliases.get(r, r) if r is not None else None for r in entry["names"]]
            provides = router is not None and not auto
            auto = auto or provides
            info = {n: _adapter_info(n, p, cfg, member_of=label) for n, p, cfg in members}
            units.append(
                Unit(uid, "route", str(path), label, [n for n, _, _ in members], names, provides, router, info)
            )
            continue
        act_mode, _ = activation(mode, spec.get("weights"), len(members))
        task_dir = (
            path
            if isinstance(spec.get("task"), dict) and spec["task"].get("meta")
            else next((p for _, p, _ in reversed(members) if (p / "task.json").is_file()), None)
        )
        task, labels = _task_info(task_dir)
        if task is None and task_dir is path:
            task = (spec["task"].get("meta") or {}).get("name")
        about: dict[str, Any] = {
            "name": label,
            "kind": "composition",
            "source": str(path),
            "variant": None,
            "task": task,
            "parameters": None,
            "joint": False,
            "mode": act_mode,
            "adapters": [n for n, _, _ in members],
        }
        if labels:
            about["labels"] = labels
        units.append(Unit(uid, "composition", str(path), label, [label], names, info={label: about}))
    return units


class Directory:
    """The ingress's map from served names (and 'auto') to units; hot loads add units, unloads remove names."""

    def __init__(self, units: list[Unit]):
        self.units: dict[str, Unit] = {}
        self.by_name: dict[str, str] = {}
        self.auto: str | None = None
        self.taken: set[str] = set()
        self.next_id = 0
        for u in units:
            self.add(u)

    @classmethod
    def from_items(cls, items) -> Directory:
        d = cls([])
        for u in plan_units(items, taken=d.taken):
            d.add(u)
        return d

    def add(self, unit: Unit) -> None:
        clash = [n for n in unit.served if n in self.by_name]
        if clash:
            raise RequestError(f"an adapter named {clash[0]!r} is already loaded; unload it first", status=409)
        self.units[unit.id] = unit
        for n in unit.served:
            self.by_name[n] = unit.id
        self.taken |= set(unit.served) | set(unit.names.values())
        if unit.auto and self.auto is None:
            self.auto = unit.id
        self.next_id = max(self.next_id, int(unit.id[1:]) + 1)

    def plan_adapter(self, name: str, path: str) -> Unit:
        """The unit of a hot-loaded adapter directory (not yet added)."""
        return plan_units([path], first_id=self.next_id, taken=set(self.taken), adapters_only=True, name=name)[0]

    def unit_for(self, adapter: str | None) -> Unit | None:
        """The unit answering requests for `adapter` (None: the frozen backbone, any replica)."""
        if adapter is None:
            return None
        if adapter == AUTO:
            if self.auto is None:
                raise RequestError(
                    "adapter 'auto' needs a route composition (vlkit compose A,B --mode route) "
                    "among --adapters; none is loaded"
                )
            return self.units[self.auto]
        if adapter not in self.by_name:
            known = ", ".join(sorted(self.by_name)) or "none loaded"
            raise RequestError(
                f"unknown adapter {adapter!r}; loaded: {known} (or 'auto', or none for the frozen backbone)", status=404
            )
        return self.units[self.by_name[adapter]]

    def remove(self, name: str) -> Unit:
        """Stop serving `name` (an adapter loaded one by one): its unit is refused from now on."""
        unit = self.unit_for(name) if name != AUTO else None
        if unit is None:
            raise RequestError(f"unknown adapter {name!r}", status=404)
        if unit.kind == "route":
            src = self.units[self.auto].source if self.auto == unit.id else unit.source
            raise RequestError(
                f"adapter {name!r} is a route of the router of {src}; it cannot be unloaded while "
                "the router serves 'auto'",
                status=409,
            )
        if unit.kind != "adapter":
            raise RequestError(
                f"{name!r} is a composition loaded with --adapters; only adapters loaded one by one can be unloaded",
                status=409,
            )
        del self.by_name[name]
        del self.units[unit.id]
        self.taken -= set(unit.served) | set(unit.names.values())
        return unit

    def names(self) -> list[str]:
        return list(self.by_name)

    def router(self) -> dict[str, Any] | None:
        if self.auto is None:
            return None
        u = self.units[self.auto]
        return {"source": u.source, "routes_to": [n or "none" for n in (u.router or [])]}


class PlannedResolver(AdapterResolver):
    """Loads a composition's adapters under the names the plan gave them (`Unit.names`)."""

    def __init__(self, backbone, names: dict[str, str]):
        super().__init__(backbone)
        self.names = names

    def load_dir(self, path: Path, preferred: str | None = None) -> str:
        key = str(Path(path).resolve())
        if key not in self.loaded and key in self.names:
            name = self.names[key]
            if name in self.model:
                raise RequestError(f"an adapter named {name!r} is already loaded on this replica", status=409)
            self.model.load_adapter(path, name=name, activate=False)
            self.loaded[key] = name
        return super().load_dir(path, preferred)


class LoadedUnit:
    """A unit on one replica. Ray Serve's multiplexer calls `__del__` when it evicts the unit (least recently
    used past --max-adapters-per-replica): the unit stops taking requests, its admitted ones are answered, then
    its adapters, heads, fusions and router leave the backbone."""

    def __init__(
        self, core: ReplicaCore, unit: Unit, entries: set[str], adapters: set[str], fusions: set[str], router=None
    ):
        self.core, self.unit = core, unit
        self.entries, self.adapters, self.fusions, self.router = entries, adapters, fusions, router
        self.inflight = 0
        self.closing = False

    def __del__(self):
        try:
            self.core.unload(self)
        except Exception:  # noqa: BLE001 - at interpreter exit or after the engine stopped
            pass


def error_reply(exc: BaseException) -> dict[str, Any]:
    """An exception as the JSON-able reply of a replica (the ingress raises it again)."""

    out: dict[str, Any] = {"error": error_text(exc), "status": http_status(exc)}
    if isinstance(exc, OverloadedError):
        out["retry_after"] = exc.retry_after
    return out


class ReplicaCore:
    """One replica: a frozen backbone, its batching engine and the units it holds (no Ray in here)."""

    def __init__(self, config, spec: str, *, tag: str = "local", device: str | None = None):

        self.config = config
        self.tag = tag
        self.backend = TorchBackend(spec, (), device=device or config.device)
        self.engine = BatchingEngine(
            self.backend.runner,
            max_batch=config.max_batch,
            max_wait_ms=config.max_wait_ms,
            queue_size=config.queue_size,
        )
        self.cond = threading.Condition()
        self.units: dict[str, LoadedUnit] = {}
        self.loads = 0
        self.unloads = 0

    # --- loading and unloading (on the engine's thread, between batches) ---------------------------
    def load(self, unit: Unit) -> LoadedUnit:
        """Load `unit` (blocking; run it in a worker thread)."""
        return self.engine.control(lambda: self._load(unit)).result()

    def _load(self, unit: Unit) -> LoadedUnit:
        cat = self.backend.catalog
        bb = cat.backbone
        with self.cond:
            held = self.units.get(unit.id)
        if held is not None and not held.closing:
            return held
        # The plan keeps names unique among the units served, so a held unit that clashes was unloaded from the
        # directory (DELETE /v1/adapters/NAME, then loaded again): drop it now.
        wanted = set(unit.served) | set(unit.names.values())
        with self.cond:
            stale = [lu for lu in self.units.values() if lu.unit.id != unit.id and wanted & (lu.entries | lu.adapters)]
            for lu in stale:
                lu.closing = True
        for lu in stale:
            self._drop_unit(lu)
        before = set(cat.entries)
        saved = (cat.router, cat.router_source)
        cat.router, cat.router_source = None, None
        with AdaptedModel.of(bb).track() as loaded:  # what this load adds: its handles, not a before/after diff
            try:
                if unit.kind == "adapter":
                    served = cat.add(unit.source, name=unit.label, adapters_only=True)
                else:
                    served = cat.add(
                        unit.source,
                        name=unit.label if unit.kind == "composition" else None,
                        resolver=PlannedResolver(bb, unit.names),
                    )
                if sorted(served) != sorted(unit.served):
                    raise AdapterFileError(
                        f"{unit.source} changed since the server started: it serves "
                        f"{', '.join(served)}, not {', '.join(unit.served)}"
                    )
            except BaseException:
                self._drop(set(cat.entries) - before, set(loaded.adapters), set(loaded.fusions))
                cat.router, cat.router_source = saved
                raise
        router = cat.router if unit.auto else None
        if not unit.auto:
            cat.router, cat.router_source = saved
        lu = LoadedUnit(self, unit, set(cat.entries) - before, set(loaded.adapters), set(loaded.fusions), router)
        with self.cond:
            self.units[unit.id] = lu
            self.loads += 1
        return lu

    def _drop(self, entries: set[str], adapters: set[str], fusions: set[str]) -> None:

        cat = self.backend.catalog
        bb = cat.backbone
        model = AdaptedModel.of(bb)
        for n in entries:
            cat.entries.pop(n, None)
        cat.text_cache = {k: v for k, v in cat.text_cache.items() if k[0] not in entries}
        for f in fusions:
            remove_fusion(bb, f)
        for a in adapters:
            if a in model:
                model.delete_adapter(a)
        cat.activate(None)

    def unload(self, lu: LoadedUnit) -> None:
        """Take `lu` off the replica once its admitted requests are answered (blocking; idempotent)."""
        with self.cond:
            if lu.closing:
                return
            lu.closing = True
            end = time.monotonic() + float(self.config.drain_timeout)
            while lu.inflight and end - time.monotonic() > 0:
                self.cond.wait(end - time.monotonic())

        if threading.current_thread() is self.engine.thread or not self.engine.thread.is_alive():
            self._drop_unit(lu)
        else:
            self.engine.control(lambda: self._drop_unit(lu)).result()

    def _drop_unit(self, lu: LoadedUnit) -> None:
        cat = self.backend.catalog
        self._drop(lu.entries, lu.adapters, lu.fusions)
        if lu.router is not None and cat.router is lu.router:
            cat.router, cat.router_source = None, None
        with self.cond:
            if self.units.get(lu.unit.id) is lu:
                del self.units[lu.unit.id]
            self.unloads += 1

    # --- requests ------------------------------------------------------------------------------------
    async def _acquire(self, get_unit: Callable[[], Awaitable[LoadedUnit]]) -> LoadedUnit:
        for _ in range(4):
            lu = await get_unit()
            with self.cond:
                if not lu.closing:
                    lu.inflight += 1
                    return lu
            await asyncio.sleep(0.01)  # evicted meanwhile: the multiplexer loads it again
        raise RequestError(
            "the adapter was unloaded from this replica while the request waited; send it again", status=503
        )

    def _release(self, lu: LoadedUnit) -> None:
        with self.cond:
            lu.inflight -= 1
            self.cond.notify_all()

    async def answer(self, op: str, data: dict, raw: bytes | None) -> dict[str, Any]:
        from starlette.concurrency import run_in_threadpool

        if op not in ("embed", "classify", "score", "answer", GENERATE):
            raise RequestError(f"unknown operation {op!r}", status=404)
        body = validate(data, GenerateBody if op == GENERATE else BODIES[op])
        item = await run_in_threadpool(build_item, self.backend, self.config, op, body, raw)
        return await asyncio.wrap_future(self.engine.submit(item))

    async def reply(
        self, op: str, data: dict, raw: bytes | None, get_unit: Callable[[], Awaitable[LoadedUnit]] | None = None
    ) -> dict[str, Any]:
        """{"result"} or {"error", "status"}, and this replica's "report": what a replica sends the ingress."""
        lu = None
        try:
            if get_unit is not None:
                lu = await self._acquire(get_unit)
            out: dict[str, Any] = {"result": await self.answer(op, data, raw)}
        except Exception as exc:  # noqa: BLE001 - every error goes back as data, with its HTTP status
            out = error_reply(exc)
        finally:
            if lu is not None:
                self._release(lu)
        out["report"] = self.report()
        return out

    async def reply_load(self, get_unit: Callable[[], Awaitable[LoadedUnit]]) -> dict[str, Any]:
        """Load a unit (a hot load) and describe what it serves."""
        try:
            lu = await self._acquire(get_unit)
            try:
                out: dict[str, Any] = {"entries": self.describe(lu.unit)}
            finally:
                self._release(lu)
        except Exception as exc:  # noqa: BLE001
            out = error_reply(exc)
        out["report"] = self.report()
        return out

    def describe(self, unit: Unit) -> dict[str, dict[str, Any]]:
        entries = self.backend.catalog.entries
        return {n: entries[n].describe() for n in unit.served if n in entries}

    def report(self) -> dict[str, Any]:
        with self.cond:
            held = {uid: list(lu.unit.served) for uid, lu in self.units.items() if not lu.closing}
            described = {
                n: d for lu in self.units.values() if not lu.closing for n, d in self.describe(lu.unit).items()
            }
        st = self.engine.stats
        return {
            "replica": self.tag,
            "held": held,
            "loads": self.loads,
            "unloads": self.unloads,
            "queue": self.engine.depth,
            "batches": st.batches,
            "batched": st.items,
            "entries": described,
        }

    def close(self, timeout: float | None = None) -> None:
        self.engine.close(timeout)
