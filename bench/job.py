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
    #: server session layouts to run, alternated: "auto" or "IxT" (sessions x threads)
    layouts: tuple[str, ...] = ("auto",)


def layout_settings(layout: str) -> dict[str, Any]:
    """``auto`` or ``IxT`` (e.g. ``1x2``: one session of two threads) as server settings;
    a ``+full`` suffix (``1x2+full``) decodes JPEGs at full size (the path before issue 26)."""
    base, plus, suffix = layout.partition("+")
    if plus and suffix != "full":
        raise ValueError(f"layout {layout!r}: the only suffix is +full")
    extra = {"full_decode": True} if plus else {}
    if base == "auto":
        return {"instances": "auto", **extra}
    instances, x, threads = base.partition("x")
    if not (x and instances.isdigit() and threads.isdigit()) or \
            int(instances) < 1 or int(threads) < 1:
        raise ValueError(f"layout {layout!r}: expected auto or SESSIONSxTHREADS, e.g. 2x1, "
                         "optionally +full")
    return {"instances": int(instances), "threads": int(threads), **extra}


def model_only(backend: OrtBackend, data: Sequence[bytes], batch_size: int) -> float:
    """Images/s of the model alone: the same batches decoded and resized beforehand."""
    batches = [preprocess(list(data[i:i + batch_size]), backend.spec.resize)[0]
               for i in range(0, len(data), batch_size)]
    backend.run(batches[0])
    start = time.perf_counter()
    for batch in batches:
        backend.run(batch)
    return len(data) / (time.perf_counter() - start)


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


def _run(cfg: JobBench, layout: str) -> tuple[float, float]:
    """One ``pretag run`` with the embedded server in ``layout``: (images/s, wall s)."""
    out = Path(tempfile.mkdtemp(prefix="pretag-bench-"))
    try:
        start = time.perf_counter()
        summary = run_locally(RunConfig(cfg.images, out, quiet=True,
                                        stream=StreamSettings(window=cfg.window)),
                              cfg.model, max_batch_size=cfg.batch_size,
                              server_settings=layout_settings(layout))
        wall = time.perf_counter() - start
    finally:
        shutil.rmtree(out, ignore_errors=True)
    if summary.failed:
        raise RuntimeError(f"{summary.failed} images failed during the benchmark")
    return summary.images_per_second, wall


def bench_job(cfg: JobBench) -> dict[str, Any]:
    """Each repeat runs the in-process loop, then every layout, in that order."""
    for layout in cfg.layouts:
        layout_settings(layout)  # refuse a bad one before any work
    paths = [i.path for i in list_images(cfg.images).items]
    backend = OrtBackend(cfg.model)  # one session on every core, as a user's own loop
    inprocess_ort(backend, paths[:cfg.batch_size], cfg.batch_size)  # warm-up
    data = [p.read_bytes() for p in paths]
    ort_rates, model_rates = [], []
    rates: dict[str, list[float]] = {layout: [] for layout in cfg.layouts}
    walls: dict[str, list[float]] = {layout: [] for layout in cfg.layouts}
    for _ in range(cfg.repeats):
        ort_rates.append(inprocess_ort(backend, paths, cfg.batch_size)["images_per_s"])
        model_rates.append(model_only(backend, data, cfg.batch_size))
        for layout in cfg.layouts:
            rate, wall = _run(cfg, layout)
            rates[layout].append(rate)
            walls[layout].append(wall)
            log.info("in-process %.1f images/s, model only %.1f, pretag run (%s) %.1f",
                     ort_rates[-1], model_rates[-1], layout, rate)
    ort, model = statistics.median(ort_rates), statistics.median(model_rates)
    rows: list[dict[str, Any]] = [{"layout": layout, "images": len(paths),
             "run_images_per_s": statistics.median(rates[layout]),
             "run_over_inprocess": statistics.median(rates[layout]) / ort,
             "run_over_model_only": statistics.median(rates[layout]) / model,
             "run_wall_s_with_startup": min(walls[layout]), "run_rates": rates[layout]}
            for layout in cfg.layouts]
    first = rows[0]
    result = {"images": len(paths), "inprocess_images_per_s": ort,
              "model_only_images_per_s": model, "inprocess_rates": ort_rates,
              "model_only_rates": model_rates, "rows": rows,
              **{k: first[k] for k in ("run_images_per_s", "run_over_inprocess",
                                       "run_wall_s_with_startup", "run_rates")}}
    if len(rows) > 1:
        result["over_first_layout"] = {row["layout"]: row["run_images_per_s"]
                                       / first["run_images_per_s"] for row in rows}
    return result
