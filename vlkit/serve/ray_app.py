"""`vlkit serve --cluster ray`: the same app on Ray Serve, adapters loaded on demand through model multiplexing.

Two deployments make one Ray Serve application:

- `VlkitIngress` (one replica, no CPU reserved): the FastAPI app of `vlkit.serve.app.build_app` with every endpoint
  (`/v1/generate` on a generative backbone too), limit, API key, error shape and metric of the single-process
  server. It parses and checks each body, finds the
  unit (`vlkit.serve.cluster`) that serves the request's adapter and calls the model deployment through a handle
  with `.options(multiplexed_model_id=UNIT)`, so Ray routes it to a replica that already holds that unit.
- `VlkitReplica` (`--replicas`, `--cpus-per-replica`, `--gpus-per-replica`): one frozen backbone each, with its
  batching engine; `@serve.multiplexed(max_num_models_per_replica=--max-adapters-per-replica)` loads a unit on the
  first request for it and evicts the least recently used one past the limit. Requests without an adapter (the
  frozen backbone) go to any replica; `auto` goes to a replica holding the route composition whose router answers it.

Ray is imported only here and only when used; without it `require_ray` raises `MissingDependencyError`.
"""

from __future__ import annotations

import asyncio
import signal
import socket
import threading
from typing import Any

from ..errors import ConfigError, MissingDependencyError, OverloadedError, RequestError
from .app import backbone_spec, build_app
from .cluster import Directory, ReplicaCore
from .inputs import adapter_of

APP_NAME = "vlkit"
REPLICA_HEADER = "x-vlkit-replica"


def require_ray():
    """(ray, ray.serve), or MissingDependencyError with the install command."""
    try:
        import ray
        from ray import serve
    except ImportError:
        raise MissingDependencyError(
            "--cluster ray needs Ray Serve, which is not installed: pip install 'vlkit[cluster]' (or 'ray[serve]')",
            package="ray[serve]",
        ) from None
    return ray, serve


class RayService:
    """What the endpoints call on the ingress: the directory of units, a handle to the replicas, and what the
    replicas last reported (units held, loads, unloads, batches), for /v1/adapters, /health and /metrics."""

    def __init__(self, config, handle, directory, spec: str):
        self.config = config
        self.handle = handle
        self.directory = directory
        self.spec = spec
        self.reports: dict[str, dict[str, Any]] = {}
        self.entries: dict[str, dict[str, Any]] = {}  # served name -> description from a replica that loaded it

    # --- calling the replicas -----------------------------------------------------------------------
    async def _call(self, method: str, unit, *args) -> dict[str, Any]:
        from ray.exceptions import RayError
        from ray.serve.exceptions import BackPressureError, RayServeException

        handle = self.handle if unit is None else self.handle.options(multiplexed_model_id=unit.id)
        try:
            reply = await getattr(handle, method).remote(*args, unit)
        except BackPressureError:
            raise OverloadedError(
                f"every replica is busy ({self.config.queue_size} requests waiting; --queue-size)", retry_after=1.0
            ) from None
        except (RayError, RayServeException) as exc:
            first = " ".join(str(exc).split())[:200]
            raise RequestError(f"no replica could answer ({type(exc).__name__}: {first})", status=503) from None
        self._note(reply.get("report"))
        if "error" in reply:
            if reply.get("status") == 429:
                raise OverloadedError(reply["error"], retry_after=float(reply.get("retry_after", 1.0)))
            raise RequestError(reply["error"], status=int(reply.get("status", 500)))
        return reply

    def _note(self, report: dict[str, Any] | None) -> None:
        if not report:
            return
        self.reports[report["replica"]] = report
        self.entries.update(report.get("entries") or {})

    # --- the service interface of vlkit.serve.app.build_app ---------------------------------------------
    async def run(self, op: str, body, raw: bytes | None) -> tuple[dict, dict]:

        unit = self.directory.unit_for(adapter_of(body.adapter))
        reply = await self._call("run", unit, op, body.model_dump(exclude_none=True), raw)
        return reply["result"], {REPLICA_HEADER: reply["report"]["replica"]}

    def _holders(self) -> dict[str, list[str]]:
        """served name -> replicas holding it (as last reported)."""
        out: dict[str, list[str]] = {}
        for tag, rep in sorted(self.reports.items()):
            for uid, names in rep["held"].items():
                if uid in self.directory.units:
                    for n in names:
                        out.setdefault(n, []).append(tag)
        return out

    async def describe(self) -> dict[str, Any]:
        holders = self._holders()
        adapters = []
        for name in self.directory.names():
            unit = self.directory.units[self.directory.by_name[name]]
            entry = dict(self.entries.get(name) or unit.info[name])
            entry["replicas"] = holders.get(name, [])
            adapters.append(entry)
        held = {
            tag: sorted(n for uid, names in rep["held"].items() if uid in self.directory.units for n in names)
            for tag, rep in sorted(self.reports.items())
        }
        return {
            "backbone": self.spec,
            "adapters": adapters,
            "router": self.directory.router(),
            "cluster": {
                "kind": "ray",
                "replicas": int(self.config.replicas),
                "max_adapters_per_replica": int(self.config.max_adapters_per_replica),
                "held": held,
                "loads": {t: r["loads"] for t, r in sorted(self.reports.items())},
                "unloads": {t: r["unloads"] for t, r in sorted(self.reports.items())},
            },
        }

    async def load(self, name: str, path: str) -> dict[str, Any]:
        unit = self.directory.plan_adapter(name, path)
        reply = await self._call("load", unit)
        self.directory.add(unit)
        self.entries.update(reply.get("entries") or {})
        entry = dict(reply["entries"].get(name) or unit.info[name])
        entry["replicas"] = [reply["report"]["replica"]]
        return entry

    async def unload(self, name: str) -> None:
        self.directory.remove(name)
        self.entries.pop(name, None)

    def health(self) -> dict[str, Any]:
        return {
            "engine": "torch",
            "backbone": self.spec,
            "adapters": len(self.directory.names()),
            "queue": sum(r.get("queue", 0) for r in self.reports.values()),
            "max_batch": int(self.config.max_batch),
            "cluster": "ray",
            "replicas": int(self.config.replicas),
        }

    def metrics(self, metrics, draining: bool) -> str:
        text = metrics.render(None, len(self.directory.names()), draining)
        rows = [
            (
                "vlkit_replica_unit_loads_total",
                "counter",
                "Adapters (or compositions) a replica loaded on demand.",
                "loads",
            ),
            (
                "vlkit_replica_unit_unloads_total",
                "counter",
                "Units a replica evicted (least recently used).",
                "unloads",
            ),
            ("vlkit_replica_batches_total", "counter", "Batches a replica ran.", "batches"),
            ("vlkit_replica_batched_requests_total", "counter", "Requests a replica ran in batches.", "batched"),
        ]
        lines = [
            "# HELP vlkit_replica_units_held Units a replica holds now (as it last reported).",
            "# TYPE vlkit_replica_units_held gauge",
        ]
        reports = sorted(self.reports.items())
        lines += [f'vlkit_replica_units_held{{replica="{t}"}} {len(r["held"])}' for t, r in reports]
        for metric, kind, help_text, key in rows:
            lines += [f"# HELP {metric} {help_text}", f"# TYPE {metric} {kind}"]
            lines += [f'{metric}{{replica="{t}"}} {int(r.get(key, 0))}' for t, r in reports]
        return text + "\n".join(lines) + "\n"

    async def close(self, timeout: float) -> None:
        return None


def build_application(config, directory, spec: str, app_name: str = APP_NAME):
    """The Ray Serve application (the ingress bound to the replicas) for `config`, to run as `app_name`."""
    _, serve = require_ray()

    device = config.device or ("cuda" if float(config.gpus_per_replica) > 0 else None)

    @serve.deployment(
        name="VlkitReplica",
        num_replicas=int(config.replicas),
        max_ongoing_requests=max(2 * int(config.max_batch), 8),
        max_queued_requests=int(config.queue_size),
        graceful_shutdown_timeout_s=float(config.drain_timeout),
        ray_actor_options={"num_cpus": float(config.cpus_per_replica), "num_gpus": float(config.gpus_per_replica)},
    )
    class VlkitReplica:
        def __init__(self, config, spec: str):
            self.core = ReplicaCore(config, spec, tag=serve.get_replica_context().replica_tag, device=device)
            self.units: dict[str, Any] = {}

        @serve.multiplexed(max_num_models_per_replica=int(config.max_adapters_per_replica))
        async def unit(self, unit_id: str):
            return await asyncio.get_running_loop().run_in_executor(None, self.core.load, self.units[unit_id])

        def _getter(self, unit):
            if unit is None:
                return None
            self.units[unit.id] = unit
            model_id = serve.get_multiplexed_model_id() or unit.id
            return lambda: self.unit(model_id)

        async def run(self, op: str, data: dict, raw: bytes | None, unit=None) -> dict[str, Any]:
            return await self.core.reply(op, data, raw, self._getter(unit))

        async def load(self, unit) -> dict[str, Any]:
            return await self.core.reply_load(self._getter(unit))

        def __del__(self):
            core = getattr(self, "core", None)
            if core is not None:
                core.close(float(core.config.drain_timeout))

    def asgi_app():  # built on the ingress replica when it starts (serve.ingress takes a builder function)

        handle = serve.get_deployment_handle("VlkitReplica", app_name=app_name)
        return build_app(config, RayService(config, handle, directory, spec))

    @serve.deployment(
        name="VlkitIngress",
        num_replicas=1,
        max_ongoing_requests=max(int(config.queue_size), 8),
        graceful_shutdown_timeout_s=float(config.drain_timeout),
        ray_actor_options={"num_cpus": 0},
    )
    @serve.ingress(asgi_app)
    class VlkitIngress:
        def __init__(self, replicas):
            self.replicas = replicas  # bound, so that Serve deploys the replicas with the ingress

    # serve.deployment made both classes Deployments (Ray's decorator is typed as returning the class)
    return VlkitIngress.bind(VlkitReplica.bind(config, spec))  # type: ignore[attr-defined]


def loopback_worker_setup() -> None:
    """Ray worker setup hook of `start_local_ray`: Serve replicas bind their inter-deployment gRPC server to
    127.0.0.1 instead of every interface (Ray Serve 2.x hard-codes `[::]:0`)."""
    try:
        import ray.serve._private.replica as replica

        bind = replica.add_port_to_grpc_server
    except (ImportError, AttributeError):  # another Ray layout: leave it as it is
        return
    if getattr(bind, "vlkit_loopback", False):
        return

    def loopback(server, address: str):
        return bind(server, address.replace("[::]", "127.0.0.1").replace("0.0.0.0", "127.0.0.1"))

    loopback.vlkit_loopback = True  # type: ignore[attr-defined]  # marks the patched function
    replica.add_port_to_grpc_server = loopback


def start_local_ray(**kwargs) -> None:
    """`ray.init` of a local instance on loopback only: the node address is 127.0.0.1, so the GCS, raylet, object
    manager and workers listen there (Ray otherwise advertises the machine's address), no dashboard, and Serve
    replicas bind their gRPC port to 127.0.0.1 (`loopback_worker_setup`). `kwargs` go to `ray.init`
    (num_cpus, num_gpus, logging_level, ...)."""
    import os

    ray, _ = require_ray()
    try:
        import ray._private.ray_constants as constants
    except ImportError:  # pragma: no cover - another Ray layout
        constants = None  # type: ignore[assignment]
    env_var = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"  # false: Ray's processes take 127.0.0.1 as the node address
    saved_env, saved = os.environ.get(env_var), getattr(constants, "ENABLE_RAY_CLUSTER", None)
    os.environ[env_var] = "0"
    if saved is not None:
        constants.ENABLE_RAY_CLUSTER = False
    runtime_env = dict(kwargs.pop("runtime_env", None) or {})
    runtime_env.setdefault("worker_process_setup_hook", f"{__name__}.loopback_worker_setup")
    try:
        ray.init(include_dashboard=False, _node_ip_address="127.0.0.1", runtime_env=runtime_env, **kwargs)
    finally:
        if saved_env is None:
            os.environ.pop(env_var, None)
        else:
            os.environ[env_var] = saved_env
        if saved is not None:
            constants.ENABLE_RAY_CLUSTER = saved


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _start_proxy(serve, host: str, port: int, log_level: str) -> int:
    """Start Serve with its HTTP proxy on host:port (port 0: a free one, tried again if another process takes it
    first); returns the port. A port in use is a ConfigError."""
    for _attempt in range(4 if port == 0 else 1):
        chosen = port or _free_port(host)
        try:
            serve.start(http_options={"host": host, "port": chosen}, logging_config={"log_level": log_level})
            return chosen
        except Exception as exc:  # noqa: BLE001 - Ray wraps the proxy's bind error in its own types
            if "bind" not in str(exc).lower():
                raise
            serve.shutdown()
    raise ConfigError(f"cannot listen on {host}:{chosen}: the address is in use (give another --port)")


class Deployment:
    """A running `--cluster ray` deployment: `url`, and `shutdown()` (Serve, and Ray when it started it)."""

    def __init__(self, url: str, started_ray: bool):
        self.url = url
        self.started_ray = started_ray

    def shutdown(self) -> None:
        """Serve, then the Ray this process started; a controller that fails to shut down gracefully (its actors
        already gone) is one warning line, and Ray is shut down all the same."""
        import logging

        ray, serve = require_ray()
        try:
            serve.shutdown()
        except Exception as exc:  # noqa: BLE001 - Ray raises its own types while its actors are going
            logging.getLogger("vlkit.serve").warning(
                "Ray Serve did not shut down cleanly: %s", " ".join(str(exc).split())[:200]
            )
        finally:
            if self.started_ray and ray.is_initialized():
                ray.shutdown()


def deploy(config, *, log_level: str = "warning") -> Deployment:
    """Plan the units, connect to Ray (--ray-address) or start a local instance on 127.0.0.1, start Serve's HTTP
    proxy on --host/--port and run the application; returns once every replica is up."""
    import logging

    config.check()
    ray, serve = require_ray()
    directory = Directory.from_items(config.adapters)  # bad --adapters: one line, before anything starts
    spec = backbone_spec(config)
    quiet = log_level.lower() not in ("debug", "info")
    if quiet:
        logging.getLogger("ray.serve").setLevel(logging.WARNING)
    started = False
    if not ray.is_initialized():
        kw: dict[str, Any] = {"logging_level": logging.WARNING if quiet else logging.INFO, "log_to_driver": not quiet}
        if config.ray_address:
            ray.init(address=config.ray_address, **kw)
        else:
            start_local_ray(**kw)
            started = True
    try:
        port = _start_proxy(serve, config.host, int(config.port), "WARNING" if quiet else "INFO")
        serve.run(build_application(config, directory, spec), name=APP_NAME, route_prefix="/")
    except BaseException:
        Deployment("", started).shutdown()
        raise
    host = f"[{config.host}]" if ":" in config.host else config.host
    return Deployment(f"http://{host}:{port}", started)


def run_cluster(config, *, on_ready=None, log_level: str = "warning") -> None:
    """`vlkit serve --cluster ray`: deploy, call `on_ready(url)`, block until SIGINT/SIGTERM, then shut Serve down
    (replicas answer what they admitted within their graceful shutdown time)."""
    stop = threading.Event()
    previous = {}

    def handler(signum, frame):
        stop.set()

    dep = deploy(config, log_level=log_level)
    try:
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, handler)
        if on_ready is not None:
            on_ready(dep.url)
        while not stop.wait(0.5):
            pass
    finally:
        for sig in previous:  # a second Ctrl-C / SIGTERM does not cut the drain short
            signal.signal(sig, signal.SIG_IGN)
        dep.shutdown()
        for sig, h in previous.items():
            signal.signal(sig, h)
