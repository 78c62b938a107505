"""`vlkit serve`: one frozen backbone serving many adapters over HTTP (FastAPI + uvicorn).

>>> from vlkit.serve import ServeConfig, create_app
>>> app = create_app(ServeConfig(backbone="tiny", adapters=["runs/med", "runs/router"]))

- `vlkit.serve.app`: the app factory, endpoints, limits, API key, error shape and metrics;
- `vlkit.serve.engine`: the batching engine (requests within `max_wait_ms`, up to `max_batch`, whatever their
  adapters) and the torch runner (one forward through the backbone's mixed-batch route);
- `vlkit.serve.catalog`: the adapters a server holds (loaded, hot loaded and unloaded) and their tasks;
- `vlkit.serve.onnx_engine`: the same endpoints over `vlkit export` directories through onnxruntime;
- `vlkit.serve.ray_app` (`--cluster ray`, needs `vlkit[cluster]`): the same app on Ray Serve, replicas loading
  adapters on demand (`serve.multiplexed`); `vlkit.serve.cluster`: its plan of units and one replica's core.
"""

from __future__ import annotations


def __getattr__(name: str):
    if name in ("create_app", "ServeConfig", "run_server"):
        from . import app

        return getattr(app, name)
    raise AttributeError(f"module 'vlkit.serve' has no attribute {name!r}")
