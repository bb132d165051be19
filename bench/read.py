"""``pretag bench read``: the read path alone (read the file, decode, resize to the model's
canvas) in images/s, pretag's path (reduced JPEG decode where the canvas allows) beside a
plain full decode + resize, alternated round by round in one process over the same files.

``threads`` workers each take every ``threads``-th image; OpenCV's own thread pool is set
to one thread for the measurement so that ``threads`` is the number of cores used.

Each row (all files, then each image format) is measured in a fresh process: the full-size
decode's speed depends on the allocator's state (glibc serves a 4 MB buffer from fresh
mmap'd pages, each faulted in, until a freed chunk raises its mmap threshold), so a row run
after another over larger images would find a warmer allocator than a real first pass.
"""

from __future__ import annotations

import logging
import multiprocessing
import statistics
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2

from pretag.contract import ResizeSpec
from pretag.job.sources import list_images
from pretag.preprocess import check_header, prepare, reduction

log = logging.getLogger(__name__)

PATHS: dict[str, Callable[[bytes, ResizeSpec], object]] = {
    "plain": lambda data, spec: prepare(data, spec, reduced=False),
    "pretag": lambda data, spec: prepare(data, spec),
}


@dataclass(frozen=True)
class ReadBench:
    images: Path
    input_size: int = 640
    threads: int = 1
    rounds: int = 5
    min_images: int = 200  # each round reads the files this many times at least, in all
    model: Path | None = None  # take the canvas from this contract model instead

    def resize(self) -> ResizeSpec:
        if self.model is not None:
            from pretag.contract import read_model_spec

            return read_model_spec(self.model).resize
        size = self.input_size
        return ResizeSpec("longest_edge", max_size=size, pad_value=114, canvas=(size, size))


def _timed_round(paths: list[Path], spec: ResizeSpec, step: Callable[[bytes, ResizeSpec],
                 object], threads: int, pool: ThreadPoolExecutor) -> float:
    """Seconds to read, decode and resize every file of ``paths`` on ``threads`` workers."""
    def work(offset: int) -> None:
        for path in paths[offset::threads]:
            step(path.read_bytes(), spec)

    start = time.perf_counter()
    list(pool.map(work, range(threads)))
    return time.perf_counter() - start


def _rates(paths: list[Path], cfg: ReadBench, spec: ResizeSpec) -> dict[str, float]:
    """Median images/s of each path over ``cfg.rounds`` alternated rounds (in this process,
    OpenCV on one thread)."""
    cv2.setNumThreads(1)
    copies = max(1, -(-cfg.min_images // max(1, len(paths))))
    work = paths * copies
    seconds: dict[str, list[float]] = {name: [] for name in PATHS}
    with ThreadPoolExecutor(cfg.threads) as pool:
        for step in PATHS.values():  # warm-up: page cache, OpenCV's first calls
            _timed_round(paths, spec, step, cfg.threads, pool)
        for _ in range(cfg.rounds):
            for name, step in PATHS.items():
                seconds[name].append(_timed_round(work, spec, step, cfg.threads, pool))
    return {name: len(work) / statistics.median(s) for name, s in seconds.items()}


def bench_read(cfg: ReadBench) -> dict[str, Any]:
    if cfg.threads < 1 or cfg.rounds < 1:
        raise ValueError("--threads and --rounds must be at least 1")
    spec = cfg.resize()
    paths = [Path(str(item.path)) for item in list_images(cfg.images).items]  # a folder here
    if not paths:
        raise ValueError(f"no images under {cfg.images}")
    groups: dict[str, list[Path]] = {}
    factors: dict[int, int] = {}
    for path in paths:
        header = check_header(path.read_bytes())
        groups.setdefault(header.format or "other", []).append(path)
        factor = reduction(header, spec)
        factors[factor] = factors.get(factor, 0) + 1
    rows = [_row("all", paths, cfg, spec)]
    if len(groups) > 1:
        rows += [_row(fmt, group, cfg, spec) for fmt, group in sorted(groups.items())]
    total = rows[0]
    return {"images_count": len(paths), "canvas": list(spec.canvas or ()),
            "resize": spec.policy, "max_size": spec.max_size, "threads": cfg.threads,
            "rounds": cfg.rounds,
            "decode_scales": {f"1/{k}": v for k, v in sorted(factors.items())},
            "images_per_s": total["images_per_s"],
            "images_per_s_per_thread": total["images_per_s_per_thread"],
            "plain_images_per_s": total["plain_images_per_s"],
            "over_plain": total["over_plain"], "rows": rows}


def _row(name: str, paths: list[Path], cfg: ReadBench, spec: ResizeSpec) -> dict[str, Any]:
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as child:
        rates = child.submit(_rates, paths, cfg, spec).result()
    log.info("%s (%d files): pretag %.1f images/s, plain %.1f", name, len(paths),
             rates["pretag"], rates["plain"])
    return {"images": name, "files": len(paths), "threads": cfg.threads,
            "images_per_s": rates["pretag"],
            "images_per_s_per_thread": rates["pretag"] / cfg.threads,
            "plain_images_per_s": rates["plain"],
            "plain_images_per_s_per_thread": rates["plain"] / cfg.threads,
            "over_plain": rates["pretag"] / rates["plain"]}
