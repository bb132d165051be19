"""Prometheus metrics, each server with its own registry (tests run several)."""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from pretag.runtime.detections import BatchInfo

_LATENCY_BUCKETS = (.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30)
_BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64)


class Metrics:
    """Requests and failures by code, queue and compute time, batch sizes, load."""

    def __init__(self, rate_window_s: float = 10.0) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("pretag_requests", "Images answered, by method and status code",
                                ["method", "code"], registry=r)
        self.queue_seconds = Histogram("pretag_queue_seconds", "Time images waited for a batch",
                                       buckets=_LATENCY_BUCKETS, registry=r)
        self.compute_seconds = Histogram("pretag_compute_seconds", "Model time per batch",
                                         buckets=_LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("pretag_batch_size", "Images per model batch",
                                    buckets=_BATCH_BUCKETS, registry=r)
        self.pending = Gauge("pretag_pending_requests",
                             "Images accepted and not yet handed to the model", registry=r)
        self.images_per_second = Gauge(
            "pretag_images_per_second", f"Images computed over the last {rate_window_s:g} s",
            registry=r)
        self._window = rate_window_s
        self._done: collections.deque[tuple[float, int]] = collections.deque()
        self._lock = threading.Lock()
        self.images_per_second.set_function(self._rate)
        self._http: Any = None

    def bind_pending(self, read: Callable[[], float]) -> None:
        self.pending.set_function(read)

    def observe_batch(self, info: BatchInfo) -> None:
        self.compute_seconds.observe(info.compute_s)
        self.batch_size.observe(info.batch_size)
        now = time.monotonic()
        with self._lock:
            self._done.append((now, info.batch_size))

    def observe_request(self, info: BatchInfo) -> None:
        self.queue_seconds.observe(info.queue_s)

    def count(self, method: str, code: str) -> None:
        self.requests.labels(method=method, code=code).inc()

    def _rate(self) -> float:
        now = time.monotonic()
        with self._lock:
            while self._done and self._done[0][0] < now - self._window:
                self._done.popleft()
            return sum(n for _, n in self._done) / self._window

    def serve_http(self, port: int, addr: str = "0.0.0.0") -> int:
        """Expose /metrics on ``port`` (0 picks a free one); returns the port."""
        server, _thread = start_http_server(port, addr=addr, registry=self.registry)
        self._http = server
        return int(server.server_port)

    def stop_http(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
