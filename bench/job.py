"""Whole-job benchmark: ``pretag run`` (embedded server) against a plain in-process ONNX
Runtime loop over the same files, alternated, so the cost of decoding, gRPC and writing
shows as one ratio."""

from __future__ import annotations

import logging
import shutil
import statistics
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pretag.job.run import RunConfig
from pretag.job.sources import list_images
from pretag.job.storage import AnyPath
from pretag.job.stream import StreamSettings
from pretag.local import run_locally
from pretag.preprocess import preprocess
from pretag.runtime.backend import OrtBackend
from pretag.server.config import BatchingConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class JobBench:
    model: Path
    images: Path
    batch_size: int = BatchingConfig.max_batch_size
    repeats: int = 2
    window: int = 32


def inprocess_ort(backend: OrtBackend, images: Sequence[AnyPath | bytes], batch_size: int
                  ) -> dict[str, float]:
    """What a user would write: read, decode, resize, run in batches, one after another.

    ``images``: files (read inside the timed loop) or encoded images already in memory.
    """
    start = time.perf_counter()
    for i in range(0, len(images), batch_size):
        chunk = [x if isinstance(x, bytes) else x.read_bytes()
                 for x in images[i:i + batch_size]]
        batch, _ = preprocess(chunk, backend.spec.resize)
        backend.run(batch)
    seconds = time.perf_counter() - start
    return {"images": len(images), "seconds": seconds, "images_per_s": len(images) / seconds}


def bench_job(cfg: JobBench) -> dict[str, Any]:
    paths = [i.path for i in list_images(cfg.images).items]
    backend = OrtBackend(cfg.model)  # the same default providers as pretag run
    inprocess_ort(backend, paths[:cfg.batch_size], cfg.batch_size)  # warm-up
    ort_rates, run_rates, run_walls = [], [], []
    for _ in range(cfg.repeats):
        ort_rates.append(inprocess_ort(backend, paths, cfg.batch_size)["images_per_s"])
        out = Path(tempfile.mkdtemp(prefix="pretag-bench-"))
        try:
            start = time.perf_counter()
            summary = run_locally(RunConfig(cfg.images, out, quiet=True,
                                            stream=StreamSettings(window=cfg.window)),
                                  cfg.model, max_batch_size=cfg.batch_size)
            run_walls.append(time.perf_counter() - start)
        finally:
            shutil.rmtree(out, ignore_errors=True)
        if summary.failed:
            raise RuntimeError(f"{summary.failed} images failed during the benchmark")
        run_rates.append(summary.images_per_second)
        log.info("in-process %.1f images/s, pretag run %.1f images/s", ort_rates[-1],
                 run_rates[-1])
    ort, run = statistics.median(ort_rates), statistics.median(run_rates)
    return {"images": len(paths), "inprocess_images_per_s": ort, "run_images_per_s": run,
            "run_over_inprocess": run / ort, "run_wall_s_with_startup": min(run_walls),
            "inprocess_rates": ort_rates, "run_rates": run_rates}
