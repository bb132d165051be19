"""Server end-to-end benchmark: encoded images in, predictions out, over DetectStream and
unary Detect, at a sweep of requests in flight; server CPU and peak RSS from psutil.

The server runs as a separate ``pretag serve`` process (as users run it); the load
generator is an asyncio client in this process. Each point runs windows until the
throughput is stable (perf_analyzer's rule, see :class:`Stability`), after a warm-up.
"""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
from prometheus_client.parser import text_string_to_metric_families

from pretag.bench.stats import Stability, best_rows, measure_until_stable, percentiles
from pretag.client.api import AsyncClient
from pretag.job.sources import list_images
from pretag.server.app import wait_ready
from pretag.server.config import BatchingConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServerBench:
    model: Path
    images: Path
    concurrency: tuple[int, ...] = (1, 2, 4, 8, 16, 32)
    modes: tuple[str, ...] = ("stream", "unary")
    stability: Stability = field(default_factory=Stability)
    warmup_s: float = 2.0
    max_batch_size: int = BatchingConfig.max_batch_size
    image_limit: int = 64
    memory_requests: tuple[int, ...] = ()  # e.g. (500, 5000): RSS after that many requests
    embeddings: str = "none"  # vectors asked for with every image: none, image, objects, all


class ServerProcess:
    """``pretag serve`` on free ports, with a psutil sampler for CPU time and peak RSS."""

    def __init__(self, model: Path, *args: str) -> None:
        self._folder = tempfile.TemporaryDirectory(prefix="pretag-bench-")
        ready = Path(self._folder.name) / "ready.json"
        cmd = [sys.executable, "-m", "pretag.cli", "serve", "--model", str(model), "--host",
               "127.0.0.1", "--port", "0", "--metrics-port", "0", "--ready-file", str(ready),
               *args]
        self.proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
        threading.Thread(target=self._drain_log, daemon=True).start()
        info = wait_ready(ready, self.proc, timeout_s=600)
        self.port, self.metrics_port = int(info["port"]), int(info["metrics_port"])
        self.ps = psutil.Process(self.proc.pid)
        self.peak_rss = 0
        self._stop = threading.Event()
        threading.Thread(target=self._sample, daemon=True).start()

    def _drain_log(self) -> None:
        assert self.proc.stderr is not None
        for _ in self.proc.stderr:
            pass

    def _sample(self) -> None:
        while not self._stop.wait(0.05):
            try:
                self.peak_rss = max(self.peak_rss, self.ps.memory_info().rss)
            except psutil.Error:
                return

    def cpu_s(self) -> float:
        t = self.ps.cpu_times()
        return float(t.user + t.system)

    def rss(self) -> int:
        return int(self.ps.memory_info().rss)

    def batch_counts(self) -> tuple[float, float]:
        """(sum, count) of the server's batch size histogram."""
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        text = urllib.request.urlopen(url, timeout=10).read().decode()
        values = {s.name: s.value for f in text_string_to_metric_families(text)
                  for s in f.samples if s.name.startswith("pretag_batch_size_")}
        return values.get("pretag_batch_size_sum", 0.0), values.get("pretag_batch_size_count", 0.0)

    def stop(self) -> int:
        self._stop.set()
        self.proc.terminate()
        return self.proc.wait(120)


async def _stream_load(address: str, data: list[bytes], window: int, seconds: float,
                       embeddings: str) -> list[float]:
    """``window`` requests in flight on one stream; latency from send to answer.

    The window is kept here (not by the client) so that the clock of a request
    starts when it is sent, not while it waits for a free slot.
    """
    sent: dict[str, float] = {}
    latencies: list[float] = []
    slots = asyncio.Semaphore(window)
    end = time.perf_counter() + seconds

    async def items() -> AsyncIterator[tuple[str, bytes]]:
        i = 0
        while True:
            await slots.acquire()
            if time.perf_counter() >= end:
                return
            sent[str(i)] = time.perf_counter()
            yield str(i), data[i % len(data)]
            i += 1

    async with AsyncClient(address) as client:
        async for pred in client.detect_stream(items(), embeddings=embeddings):
            latencies.append(time.perf_counter() - sent.pop(pred.id))
            slots.release()
            if pred.error is not None:
                raise RuntimeError(f"benchmark request failed: {pred.error}")
    return latencies


async def _unary_load(address: str, data: list[bytes], concurrency: int, seconds: float,
                      embeddings: str) -> list[float]:
    latencies: list[float] = []
    end = time.perf_counter() + seconds

    async with AsyncClient(address) as client:
        async def caller(k: int) -> None:
            i = k
            while time.perf_counter() < end:
                start = time.perf_counter()
                await client.detect(data[i % len(data)], id=str(i), embeddings=embeddings)
                latencies.append(time.perf_counter() - start)
                i += concurrency

        await asyncio.gather(*(caller(k) for k in range(concurrency)))
    return latencies


def _window(server: ServerProcess, mode: str, data: list[bytes], concurrency: int,
            seconds: float, embeddings: str = "none") -> dict[str, Any]:
    address = f"127.0.0.1:{server.port}"
    cpu0, (bsum0, bcount0), start = server.cpu_s(), server.batch_counts(), time.perf_counter()
    load = _stream_load if mode == "stream" else _unary_load
    latencies = asyncio.run(load(address, data, concurrency, seconds, embeddings))
    elapsed = time.perf_counter() - start
    bsum, bcount = server.batch_counts()
    return {"images": len(latencies), "seconds": elapsed, "latencies": latencies,
            "server_cpu_percent": 100 * (server.cpu_s() - cpu0) / elapsed,
            "mean_batch_size": (bsum - bsum0) / max(1.0, bcount - bcount0)}


def _memory(server: ServerProcess, data: list[bytes], counts: tuple[int, ...]) -> dict[str, Any]:
    """Current and peak server RSS after ``counts`` cumulative requests (stream, window 16)."""
    out: dict[str, Any] = {}
    done = 0
    for target in counts:
        async def send(n: int) -> None:
            async def items() -> AsyncIterator[tuple[str, bytes]]:
                for i in range(n):
                    yield str(i), data[i % len(data)]

            async with AsyncClient(f"127.0.0.1:{server.port}") as client:
                async for pred in client.detect_stream(items(), window=16):
                    if pred.error is not None:
                        raise RuntimeError(str(pred.error))

        asyncio.run(send(target - done))
        done = target
        out[str(target)] = {"rss_mb": server.rss() / 2**20, "peak_rss_mb": server.peak_rss / 2**20}
        log.info("after %d requests: RSS %.0f MB", target, out[str(target)]["rss_mb"])
    return out


def bench_server(cfg: ServerBench) -> dict[str, Any]:
    items = list_images(cfg.images).items[:cfg.image_limit]
    data = [i.path.read_bytes() for i in items]
    server = ServerProcess(cfg.model, "--max-batch-size", str(cfg.max_batch_size))
    rows = []
    try:
        for mode in cfg.modes:
            for c in cfg.concurrency:
                _window(server, mode, data, c, cfg.warmup_s, cfg.embeddings)  # not counted
                def window(s: float, m: str = mode, c: int = c) -> dict[str, Any]:
                    return _window(server, m, data, c, s, cfg.embeddings)

                r = measure_until_stable(window, cfg.stability)
                row = {"mode": mode, "concurrency": c, "images_per_s": r["images_per_s"],
                       **percentiles(r.pop("latencies")),
                       "mean_batch_size": r["mean_batch_size"],
                       "server_cpu_percent": r["server_cpu_percent"],
                       "peak_rss_mb": server.peak_rss / 2**20, "stable": r["stable"],
                       "windows": r["windows"]}
                rows.append(row)
                log.info("%s x%d: %.2f images/s, p99 %.0f ms, batch %.2f", mode, c,
                         row["images_per_s"], row["p99_ms"], row["mean_batch_size"])
        memory = _memory(server, data, cfg.memory_requests) if cfg.memory_requests else {}
    finally:
        code = server.stop()
    best = best_rows(rows, "mode")
    return {"rows": rows, "best": best, "memory": memory, "server_exit_code": code,
            "images": len(data)}
