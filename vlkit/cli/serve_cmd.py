"""`vlkit serve`: serve one frozen backbone with many adapters over HTTP (FastAPI + uvicorn).

    vlkit serve --backbone tiny --adapters runs/med,runs/vqa,runs/router [--host 127.0.0.1 --port 8000]
                [--engine torch|onnx] [--max-batch 32 --max-wait-ms 5 --queue-size 256]
                [--api-key KEY | VLKIT_API_KEY] [--threads N] [--adapter-root DIR]
                [--max-inputs 256 --max-texts 256] [--allow-url-images --url-timeout 10]
                [--cluster ray --replicas 2 --gpus-per-replica 1 --max-adapters-per-replica 4 --ray-address ADDR]

The server library is `vlkit.serve`; this module only maps flags to `ServeConfig`.
"""

from __future__ import annotations

from typing import Any

import typer

FLAG_SCOPE = {  # flag -> (what it needs, the engine / cluster values it applies to)
    "--providers": ("engine", ("onnx",)),
    "--device": ("engine", ("torch",)),
    "--backbone": ("engine", ("torch",)),
    "--threads": ("cluster", ("none",)),
    "--replicas": ("cluster", ("ray",)),
    "--gpus-per-replica": ("cluster", ("ray",)),
    "--cpus-per-replica": ("cluster", ("ray",)),
    "--max-adapters-per-replica": ("cluster", ("ray",)),
    "--ray-address": ("cluster", ("ray",)),
}


def check_flags(engine: str, cluster: str, given: dict) -> None:
    """A flag that the chosen --engine / --cluster does not use is refused, not ignored."""
    from ..errors import ConfigError

    if engine not in ("torch", "onnx") or cluster not in ("none", "ray"):
        return  # ServeConfig.check says what the choices are
    chosen = {"engine": engine, "cluster": cluster}
    unused = [f for f, v in given.items() if v is not None and chosen[FLAG_SCOPE[f][0]] not in FLAG_SCOPE[f][1]]
    if unused:
        what = " ".join(f"--{k} {v}" for k, v in chosen.items())
        raise ConfigError(f"{', '.join(unused)} {'does' if len(unused) == 1 else 'do'} not apply with {what}")


def register(cli: typer.Typer) -> None:
    @cli.command("serve")
    def serve_cmd(
        backbone: str | None = typer.Option(
            None, "--backbone", "-b", help="Backbone spec (default: the adapters' own)."
        ),
        adapters: str | None = typer.Option(
            None,
            "--adapters",
            "-a",
            help="Comma-separated adapter dirs, run names, compositions, NAME=DIR (--engine onnx: export directories).",
        ),
        host: str = typer.Option("127.0.0.1", "--host", help="Address to bind (loopback unless told otherwise)."),
        port: int = typer.Option(8000, "--port", help="Port (0: a free one)."),
        engine: str = typer.Option("torch", "--engine", help="torch | onnx (vlkit export outputs via onnxruntime)."),
        max_batch: int = typer.Option(32, "--max-batch", help="Most requests run in one forward."),
        max_wait_ms: float = typer.Option(5.0, "--max-wait-ms", help="How long the first request waits for company."),
        queue_size: int = typer.Option(256, "--queue-size", help="Admitted, unanswered requests before 429."),
        max_body_bytes: int = typer.Option(8 * 1024 * 1024, "--max-body-bytes", help="Largest request body (413)."),
        max_pixels: int = typer.Option(4096 * 4096, "--max-pixels", help="Largest image, width x height (413)."),
        api_key: str | None = typer.Option(
            None, "--api-key", envvar="VLKIT_API_KEY", help="Require this key (Authorization: Bearer KEY or X-API-Key)."
        ),
        device: str | None = typer.Option(None, "--device", help="torch device (cpu, cuda, cuda:1)."),
        drain_timeout: float = typer.Option(30.0, "--drain-timeout", help="Seconds to finish requests on SIGTERM."),
        providers: str | None = typer.Option(None, "--providers", help="onnx: execution providers, comma-separated."),
        cluster: str = typer.Option(
            "none",
            "--cluster",
            help="none | ray: deploy on Ray Serve, replicas loading adapters on demand (pip install 'vlkit[cluster]').",
        ),
        replicas: int | None = typer.Option(
            None, "--replicas", help="--cluster ray: model replicas (one backbone each; 1)."
        ),
        gpus_per_replica: float | None = typer.Option(
            None, "--gpus-per-replica", help="--cluster ray: GPUs per replica (0)."
        ),
        cpus_per_replica: float | None = typer.Option(
            None, "--cpus-per-replica", help="--cluster ray: CPUs per replica (1)."
        ),
        max_adapters_per_replica: int | None = typer.Option(
            None,
            "--max-adapters-per-replica",
            help="--cluster ray: adapters a replica keeps loaded (least recently used ones are evicted; 4).",
        ),
        ray_address: str | None = typer.Option(
            None,
            "--ray-address",
            help="--cluster ray: a running Ray cluster (default: start a local instance on 127.0.0.1).",
        ),
        threads: int | None = typer.Option(
            None,
            "--threads",
            help="Intra-op threads of torch / onnxruntime "
            "(default: the library's; on a shared CPU "
            "leave cores to the HTTP side).",
        ),
        adapter_root: str | None = typer.Option(
            None,
            "--adapter-root",
            help="Hot loads (POST /v1/adapters/NAME) only from inside this "
            "directory; relative paths are taken under it.",
        ),
        max_inputs: int = typer.Option(
            256,
            "--max-inputs",
            help="Most items in one list request (embed, classify and score `inputs`; /v1/embeddings `input`).",
        ),
        max_texts: int = typer.Option(
            256, "--max-texts", help="Most texts in one input (score texts, classify labels)."
        ),
        allow_url_images: bool = typer.Option(
            False,
            "--allow-url-images",
            help="/v1/embeddings: fetch http(s) image URLs (public addresses only, "
            "--max-body-bytes and --url-timeout apply).",
        ),
        url_timeout: float = typer.Option(10.0, "--url-timeout", help="Seconds to fetch one image URL."),
        log_level: str = typer.Option("warning", "--log-level", help="uvicorn (or Ray) log level."),
    ) -> None:
        """Serve adapters over HTTP: embed, classify, score, answer; hot load; /health, /metrics, /docs."""
        import os
        import sys

        from ..serve.app import ServeConfig, run_server

        ray_only = {
            "--replicas": replicas,
            "--gpus-per-replica": gpus_per_replica,
            "--cpus-per-replica": cpus_per_replica,
            "--max-adapters-per-replica": max_adapters_per_replica,
            "--ray-address": ray_address,
        }
        check_flags(
            engine,
            cluster,
            {"--providers": providers, "--device": device, "--backbone": backbone, "--threads": threads, **ray_only},
        )
        ray: dict[str, Any] = {k[2:].replace("-", "_"): v for k, v in ray_only.items() if v is not None}
        config = ServeConfig(
            backbone=backbone,
            adapters=adapters or [],
            engine=engine,
            host=host,
            port=port,
            max_batch=max_batch,
            max_wait_ms=max_wait_ms,
            queue_size=queue_size,
            max_body_bytes=max_body_bytes,
            max_pixels=max_pixels,
            api_key=api_key,
            device=device,
            drain_timeout=drain_timeout,
            providers=[p for p in (providers or "").split(",") if p.strip()] or None,
            cluster=cluster,
            threads=threads,
            adapter_root=adapter_root,
            max_inputs=max_inputs,
            max_texts=max_texts,
            allow_url_images=allow_url_images,
            url_timeout=url_timeout,
            **ray,
        )
        config.check()
        if config.cluster == "ray":
            from ..serve.ray_app import run_cluster

            def cluster_ready(url: str) -> None:
                sys.stderr.write(
                    f"vlkit serve: torch engine on {url} (Ray Serve: {config.replicas} replicas, up to "
                    f"{config.max_adapters_per_replica} adapters each; docs at /docs)\n"
                )
                sys.stderr.flush()

            run_cluster(config, on_ready=cluster_ready, log_level=log_level)
            if (
                getattr(getattr(sys.modules.get("__main__"), "__spec__", None), "name", "") == "vlkit.__main__"
                or os.path.basename(sys.argv[0]) == "vlkit"
            ):
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(0)  # drained and shut down: Ray's C++ threads must not abort the interpreter's teardown
            return

        def ready(server) -> None:
            bound = [s.getsockname() for srv in server.servers for s in srv.sockets]
            where = ", ".join(f"http://{h}:{p}" for h, p, *_ in bound)
            sys.stderr.write(f"vlkit serve: {config.engine} engine on {where} (docs at /docs)\n")
            sys.stderr.flush()

        run_server(config, on_ready=ready, log_level=log_level)
