"""``pretag run --ray`` against the embedded gRPC path over the same files, alternated.

The dataset is the given folder linked ``copies`` times (1,024 images from coco128 with
8). Each job is timed three ways: the whole call (a local server's start and warm-up,
or the Ray actors' start and model load, included), the job's own seconds as its
summary gives them, and the steady rate: images finished between the 10th and the 90th
percentile of completion times, over the time between them. The Ray runs share one
local cluster started once (a real deployment keeps its cluster too).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from pretag.job.run import RunConfig, RunSummary
from pretag.job.sources import list_images
from pretag.local import run_locally
from pretag.runtime.backend import BackendConfig
from pretag.scale.ray_job import RaySettings, run_on_ray
from pretag.scale.stages import write_block

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RayBench:
    model: Path
    images: Path
    copies: int = 8
    repeats: int = 2
    actors: tuple[int, ...] = (1, 2)
    shard_images: int = 128  # both paths; the Ray driver hears of a block once it is written
    stages_only: bool = False  # only the per-stage rates, no jobs (no Ray needed)


def link_copies(images: Path, copies: int, out: Path) -> int:
    """``copies`` folders of symbolic links to every image under ``images``."""
    paths = [Path(str(item.path)) for item in list_images(images).items]
    for copy in range(copies):
        folder = out / f"copy{copy}"
        for path in paths:
            link = folder / path.relative_to(images)
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(path.resolve())
    return len(paths) * copies


def steady_rate(times: list[float]) -> float:
    """Images per second between the 10th and the 90th percentile of finish times."""
    times = sorted(times)
    low, high = len(times) // 10, len(times) * 9 // 10
    span = times[high - 1] - times[low]
    return (high - 1 - low) / span if span > 0 else 0.0


def timed(job: Callable[..., RunSummary]) -> dict[str, float]:
    """``job(on_result=...)`` timed; see the module docstring."""
    finished: list[float] = []
    start = time.perf_counter()
    summary = job(on_result=lambda _name, _ok: finished.append(time.perf_counter()))
    wall = time.perf_counter() - start
    if summary.failed or summary.written != len(finished):
        raise RuntimeError(f"{summary.failed} images failed during the benchmark")
    return {"wall_s": wall, "job_s": summary.seconds,
            "images_per_s": summary.written / wall, "steady_images_per_s":
            steady_rate(finished)}


def ray_settings(actors: int) -> RaySettings:
    """Every core busy: the actors share the cores but one Ray CPU, kept for writing."""
    cores = os.cpu_count() or 1
    return RaySettings(actors=actors, cpus_per_actor=max(cores - 1, 1) / actors,
                       backend=BackendConfig(threads=max(1, cores // actors)))


def bench_ray(cfg: RayBench) -> dict[str, Any]:
    import ray

    data = Path(tempfile.mkdtemp(prefix="pretag-bench-ray-"))
    try:
        count = link_copies(cfg.images, cfg.copies, data)
        stages = stage_rates(cfg.model, data)
        if cfg.stages_only:
            return {"rows": [], "stages": stages}
        ray.init(include_dashboard=False)
        try:
            return {**_alternate(cfg, data, count), "stages": stages}
        finally:
            ray.shutdown()
    finally:
        shutil.rmtree(data, ignore_errors=True)


def _rate(count: int, run: Callable[[], Any]) -> float:
    start = time.perf_counter()
    run()
    return count / (time.perf_counter() - start)


def stage_rates(model: Path, data: Path, images: int = 256) -> dict[str, float]:
    """Images per second of each pipeline stage run alone in this process, one CPU
    thread unless said otherwise: what an actor, a read task, a write task and the
    driver can each sustain (the inputs of the N-node estimate in RESULTS.md)."""
    from pretag.job.stats import Histogram
    from pretag.job.stream import JobState
    from pretag.scale.stages import Detector, DetectorConfig, WriteConfig, read_images

    items = list_images(data).items[:images]
    rows = {"index": np.arange(len(items)), "name": np.array([i.name for i in items], object),
            "path": np.array([str(i.path) for i in items], object)}
    detector = Detector(model.read_bytes(), DetectorConfig(0.5, 8, BackendConfig(threads=1)))
    resize = detector.spec.resize
    chunks = [{k: v[i:i + 16] for k, v in rows.items()} for i in range(0, len(items), 16)]
    out: dict[str, float] = {}
    read: list[dict[str, np.ndarray]] = []
    out["read_decode_resize"] = _rate(len(items), lambda: read.extend(
        read_images(c, resize, 100_000_000) for c in chunks))
    found: list[dict[str, np.ndarray]] = []
    out["detect_1_thread"] = _rate(len(items), lambda: found.extend(map(detector, read)))
    two = Detector(model.read_bytes(), DetectorConfig(0.5, 8, BackendConfig(threads=2)))
    out["detect_2_threads"] = _rate(len(items), lambda: list(map(two, read)))
    folder = Path(tempfile.mkdtemp(prefix="pretag-bench-write-"))
    try:
        config = WriteConfig(str(folder), detector.spec.class_names, "image", 1)
        written = [write_block(b, config) for b in found[:1]]  # folders made, then timed
        out["write_local"] = _rate(sum(len(b["name"]) for b in found[1:]), lambda: written
                                   .extend(write_block(b, config) for b in found[1:]))
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    state = JobState(Histogram(detector.spec.class_names))
    by_name = {i.name: i for i in items}
    def record() -> None:
        for block in written:
            for name, entry in zip(block["name"], block["entry"], strict=True):
                state.record(by_name[str(name)], json.loads(entry), None)

    out["driver_record"] = _rate(len(items), record)
    return out


def _alternate(cfg: RayBench, data: Path, count: int) -> dict[str, Any]:
    runs: dict[str, list[dict[str, float]]] = {"grpc": []}
    runs.update({f"ray_{n}": [] for n in cfg.actors})
    for _ in range(cfg.repeats):
        for name in runs:
            out = Path(tempfile.mkdtemp(prefix="pretag-bench-out-"))
            config = RunConfig(data, out, quiet=True, shard_images=cfg.shard_images)
            job = (partial(run_locally, config, cfg.model) if name == "grpc" else
                   partial(run_on_ray, config, cfg.model, ray_settings(int(name[4:]))))
            try:
                found = timed(job)
            finally:
                shutil.rmtree(out, ignore_errors=True)
            runs[name].append(found)
            log.info("%s: %s", name, {k: round(v, 2) for k, v in found.items()})
    rows = []
    for name, taken in runs.items():
        row: dict[str, Any] = {"executor": name, "images": count}
        for key in taken[0]:
            row[key] = statistics.median(r[key] for r in taken)
        rows.append(row)
    base = rows[0]
    for row in rows:
        row["over_grpc"] = row["images_per_s"] / base["images_per_s"]
        row["steady_over_grpc"] = row["steady_images_per_s"] / base["steady_images_per_s"]
    settings = {f"ray_{n}": ray_settings(n).__dict__ for n in cfg.actors}
    return {"rows": rows, "runs": runs, "ray_settings": settings,
            "shard_images": cfg.shard_images}
