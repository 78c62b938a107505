"""Prometheus text-format metrics of `vlkit serve` (no client library: a few counters and one histogram)."""

from __future__ import annotations

import threading
import time

BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Metrics:
    def __init__(self):
        self.lock = threading.Lock()
        self.requests: dict[tuple[str, int], int] = {}
        self.latency: dict[str, list[float]] = {}  # endpoint -> [count per bucket..., +Inf count, sum]
        self.inflight = 0
        self.server_errors = 0  # 500s from a bug (logged with their request id)
        self.started = time.time()

    def observe(self, endpoint: str, status: int, seconds: float, server_error: bool = False) -> None:
        with self.lock:
            self.server_errors += int(server_error)
            self.requests[(endpoint, status)] = self.requests.get((endpoint, status), 0) + 1
            h = self.latency.setdefault(endpoint, [0.0] * (len(BUCKETS) + 2))
            for i, b in enumerate(BUCKETS):
                if seconds <= b:
                    h[i] += 1
            h[len(BUCKETS)] += 1
            h[len(BUCKETS) + 1] += seconds

    def render(self, engine=None, adapters: int = 0, draining: bool = False) -> str:
        lines = [
            "# HELP vlkit_requests_total Requests answered, by endpoint and HTTP status.",
            "# TYPE vlkit_requests_total counter",
        ]
        with self.lock:
            for (ep, status), n in sorted(self.requests.items()):
                lines.append(f'vlkit_requests_total{{endpoint="{ep}",status="{status}"}} {n}')
            lines += [
                "# HELP vlkit_request_seconds Request latency in seconds, by endpoint.",
                "# TYPE vlkit_request_seconds histogram",
            ]
            for ep, h in sorted(self.latency.items()):
                for i, b in enumerate(BUCKETS):
                    lines.append(f'vlkit_request_seconds_bucket{{endpoint="{ep}",le="{b}"}} {int(h[i])}')
                lines.append(f'vlkit_request_seconds_bucket{{endpoint="{ep}",le="+Inf"}} {int(h[len(BUCKETS)])}')
                lines.append(f'vlkit_request_seconds_sum{{endpoint="{ep}"}} {h[len(BUCKETS) + 1]:.6f}')
                lines.append(f'vlkit_request_seconds_count{{endpoint="{ep}"}} {int(h[len(BUCKETS)])}')
            inflight, errors = self.inflight, self.server_errors
        lines += [
            "# HELP vlkit_server_errors_total Requests answered 500 because of a bug (logged with their request id).",
            "# TYPE vlkit_server_errors_total counter",
            f"vlkit_server_errors_total {errors}",
            "# HELP vlkit_inflight_requests Requests being handled now.",
            "# TYPE vlkit_inflight_requests gauge",
            f"vlkit_inflight_requests {inflight}",
            "# HELP vlkit_adapters_loaded Served adapter names.",
            "# TYPE vlkit_adapters_loaded gauge",
            f"vlkit_adapters_loaded {adapters}",
            "# HELP vlkit_draining 1 while the server drains after SIGTERM.",
            "# TYPE vlkit_draining gauge",
            f"vlkit_draining {int(draining)}",
            "# HELP vlkit_uptime_seconds Seconds since the server started.",
            "# TYPE vlkit_uptime_seconds gauge",
            f"vlkit_uptime_seconds {time.time() - self.started:.3f}",
        ]
        if engine is not None:
            st = engine.stats
            lines += [
                "# HELP vlkit_queue_depth Requests waiting for a batch.",
                "# TYPE vlkit_queue_depth gauge",
                f"vlkit_queue_depth {engine.depth}",
                "# HELP vlkit_batches_total Batches run.",
                "# TYPE vlkit_batches_total counter",
                f"vlkit_batches_total {st.batches}",
                "# HELP vlkit_batched_requests_total Requests run in batches.",
                "# TYPE vlkit_batched_requests_total counter",
                f"vlkit_batched_requests_total {st.items}",
                "# HELP vlkit_batch_forward_seconds_total Seconds spent running batches.",
                "# TYPE vlkit_batch_forward_seconds_total counter",
                f"vlkit_batch_forward_seconds_total {st.forward_seconds:.6f}",
                "# HELP vlkit_batch_size Batches by size.",
                "# TYPE vlkit_batch_size gauge",
            ]
            for size, n in sorted(dict(st.batch_sizes).items()):
                lines.append(f'vlkit_batch_size{{size="{size}"}} {n}')
        return "\n".join(lines) + "\n"
