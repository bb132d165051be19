"""``pretag bench select``: the selection loop at scale, on synthetic vectors and class counts,
and the plain loop (every distance and balance value recomputed for every sample after each
pick) as the baseline.

The synthetic set stands in for a fleet's camera data, whose embeddings have a low
intrinsic dimension: images come from ``domains`` (road types, weather, time of day) split
into scenes (one drive past one place) of about ``frames_per_scene`` frames. Each image is a
point in a ``latent``-dimensional space (domain centre, scene offset ``scene_scale``, frame
offset ``frame_scale``, all Gaussian), mapped to ``dim`` by one random linear map, plus
uniform noise in every dimension (``noise`` of the signal's norm), then L2-normalised. Each
class count is Poisson with a rate set by the domain. Every figure names these parameters;
a set spread evenly over the sphere (``--spread``: no structure) is the worst case, where
the cells skip nothing and the loop is a plain scan.

Two more shapes of the latent points (``shape``), with the same lift, noise and counts:
``drives``, each drive a trajectory of ``frames_per_scene`` x 5 frames through the latent
space (a heading that turns a little every frame, a step of ``frame_scale``), as a fleet's
video frames are; ``mixture``, clusters of heavy-tailed sizes (Zipf, exponent 1.1: a few
clusters hold most frames, most hold a handful), as repeated routes and rare places give.
"""

from __future__ import annotations

import logging
import multiprocessing
import resource
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from pretag.contract import DRIVING_CLASSES
from pretag.job.vectors import embeddings_dir, vector_shards, write_table
from pretag.selection.config import Strategy
from pretag.selection.cover import LEAF
from pretag.selection.greedy import Objective, Search, greedy
from pretag.selection.reference import plain_greedy
from pretag.selection.rows import ShardRows

log = logging.getLogger(__name__)

CLASSES = DRIVING_CLASSES
TARGET = np.array([0.1, 0.1, 0.5, 0.1, 0.1, 0.05, 0.05])
_SHARD = 1024  # images a shard, as pretag run writes them by default


@dataclass(frozen=True)
class Synthetic:
    n: int
    dim: int = 1280
    latent: int = 24
    domains: int = 40
    frames_per_scene: int = 100
    scene_scale: float = 0.5
    frame_scale: float = 0.15
    noise: float = 0.05
    seed: int = 0
    shape: str = "scenes"  # scenes | drives | mixture (see the module's docstring)
    dtype: str = "float32"  # of the vectors made (a run stores float16)


def synthetic(spec: Synthetic) -> tuple[np.ndarray, np.ndarray]:
    """(unit vectors [n, dim] float32, class counts [n, 7]), made in chunks so the vectors
    are the only large allocation."""
    rng = np.random.default_rng(spec.seed)
    scenes = max(1, spec.n // spec.frames_per_scene)
    domain_mean = rng.standard_normal((spec.domains, spec.latent))
    scene_domain = rng.integers(0, spec.domains, scenes)
    scene_mean = domain_mean[scene_domain] + spec.scene_scale * rng.standard_normal(
        (scenes, spec.latent))
    lift = (rng.standard_normal((spec.latent, spec.dim)) / np.sqrt(spec.dim)).astype(np.float32)
    rates = rng.gamma(0.6, 1.0, (spec.domains, len(CLASSES))) * np.array(
        [0.3, 0.2, 4.0, 0.3, 1.5, 0.05, 0.6])
    scene_of = rng.integers(0, scenes, spec.n)
    vectors = np.empty((spec.n, spec.dim), dtype=spec.dtype)
    scale = np.float32(2 * spec.noise * np.sqrt(3.0 / spec.dim) * np.sqrt(spec.latent))
    points, domain_of = None, scene_domain[scene_of]
    if spec.shape != "scenes":
        points, domain_of = _latent_points(spec, domain_mean)
    for s in range(0, spec.n, 65536):
        scene = scene_of[s:s + 65536]
        z = scene_mean[scene] + spec.frame_scale * rng.standard_normal((len(scene),
                                                                         spec.latent))
        if points is not None:
            z = points[s:s + 65536]
        block = z.astype(np.float32) @ lift
        noise = rng.random(block.shape, dtype=np.float32)
        noise -= np.float32(0.5)
        noise *= scale
        block += noise
        block /= np.linalg.norm(block, axis=1, keepdims=True)
        vectors[s:s + 65536] = block
    counts = rng.poisson(rates[domain_of]).astype(np.float64)
    return vectors, counts


def _latent_points(spec: Synthetic, domain_mean: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(latent point of every image [n, latent] float32, its domain) for ``drives`` and
    ``mixture`` (from their own random stream, so ``scenes`` stays as it was)."""
    rng = np.random.default_rng(spec.seed + 1)
    if spec.shape == "mixture":
        clusters = max(1, spec.n // spec.frames_per_scene)
        weights = 1.0 / np.arange(1, clusters + 1) ** 1.1
        cluster_of = rng.choice(clusters, spec.n, p=weights / weights.sum())
        domain = rng.integers(0, spec.domains, clusters)
        centre = domain_mean[domain] + spec.scene_scale * rng.standard_normal(
            (clusters, spec.latent))
        points = centre[cluster_of] + spec.frame_scale * rng.standard_normal(
            (spec.n, spec.latent))
        return points.astype(np.float32), domain[cluster_of]
    if spec.shape != "drives":
        raise ValueError(f"unknown shape {spec.shape!r}: scenes, drives or mixture")
    length = 5 * spec.frames_per_scene
    drives = -(-spec.n // length)
    domain = rng.integers(0, spec.domains, drives)
    points = np.empty((drives, length, spec.latent), np.float32)
    heading = rng.standard_normal((drives, spec.latent))
    where = domain_mean[domain] + spec.scene_scale * rng.standard_normal((drives, spec.latent))
    for t in range(length):  # a heading that turns a little, a step a frame
        heading += 0.3 * rng.standard_normal(heading.shape)
        heading /= np.linalg.norm(heading, axis=1, keepdims=True)
        where += spec.frame_scale * heading
        points[:, t] = where
    return points.reshape(-1, spec.latent)[:spec.n], np.repeat(domain, length)[:spec.n]


def objectives_for(vectors: np.ndarray, counts: np.ndarray) -> list[Objective]:
    """DIVERSITY on the vectors and BALANCE toward the seed example's target."""
    return [Objective(Strategy("DIVERSITY"), "diversity", vectors),
            Objective(Strategy("BALANCE"), "balance", counts, TARGET)]


@dataclass(frozen=True)
class SelectBench:
    sizes: tuple[int, ...] = (100_000, 1_000_000)
    picks: int = 10_000
    dim: int = 1280
    baseline_size: int = 20_000
    spread: bool = False  # vectors spread evenly over the sphere instead (the worst case)
    earlier: int = 0  # a datapool's earlier picks beside the candidates (drawn alike)
    shape: str = "scenes"  # the synthetic set's shape (scenes | drives | mixture)
    latent: int = 24  # its intrinsic dimension
    noise: float = 0.05  # its uniform noise, of the signal's norm
    dtype: str = "float16"  # the vectors' type: float16 as a run stores them, or float32
    #: the vectors written as a run's Parquet shards (1024 a shard, in one child) and read
    #: from there (in another), as pretag select reads them: the peak is the selection's
    stream: bool = False


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _made(n: int, bench: SelectBench) -> tuple[np.ndarray, np.ndarray, float]:
    """(vectors, class counts, seconds taken) of ``n`` images and the earlier picks."""
    spec = Synthetic(n, bench.dim, latent=bench.latent, noise=bench.noise, shape=bench.shape,
                     dtype=bench.dtype)
    t0 = time.perf_counter()
    if bench.spread:
        rng = np.random.default_rng(0)
        vectors = np.empty((n, bench.dim), dtype=bench.dtype)
        for s in range(0, n, 65536):
            block = rng.standard_normal((min(65536, n - s), bench.dim), dtype=np.float32)
            vectors[s:s + 65536] = block / np.linalg.norm(block, axis=1, keepdims=True)
        counts = synthetic(Synthetic(n, 8))[1]
    else:
        vectors, counts = synthetic(replace(spec, n=n + bench.earlier))
    return vectors, counts, time.perf_counter() - t0


def _write_run(n: int, bench: SelectBench, folder: str) -> float:
    """Runs in a child process: the set as a run's vector shards (images-NNNNNN.parquet,
    1024 images each, float16) and its class counts beside them; returns the seconds the
    set took to make."""
    vectors, counts, made = _made(n, bench)
    root = embeddings_dir(Path(folder))
    root.mkdir(parents=True)
    for number, s in enumerate(range(0, len(vectors), _SHARD), start=1):
        block = np.asarray(vectors[s:s + _SHARD], np.float16)
        column = pa.FixedSizeListArray.from_arrays(pa.array(block.reshape(-1)), bench.dim)
        write_table(pa.table({"filename": _names(s, s + len(block)), "vector": column}),
                    root / f"images-{number:06d}.parquet")
    np.save(Path(folder) / "counts.npy", counts)
    return made


def _names(start: int, end: int) -> list[str]:
    return [f"{i:08d}.jpg" for i in range(start, end)]


def _from_run(folder: str) -> tuple[ShardRows, np.ndarray]:
    counts = np.load(Path(folder) / "counts.npy")
    paths, total = vector_shards(Path(folder))
    return ShardRows.of_run(paths, _names(0, total)), counts


def _one_size(n: int, bench: SelectBench, baseline: bool, folder: str | None = None
              ) -> dict[str, Any]:
    """Runs in a child process, so that its peak memory is its own (``folder``: the
    set's shards, :func:`_write_run`)."""
    before = _peak_mb()
    vectors: Any
    if folder is None:
        vectors, counts, made = _made(n, bench)
    else:
        (vectors, counts), made = _from_run(folder), 0.0
    objectives = objectives_for(vectors, counts)
    everyone = np.zeros(len(vectors), dtype=bool)
    everyone[:n] = True  # the candidates; the rest are the earlier picks
    prior = np.arange(n, len(vectors)) if bench.earlier else None
    t0 = time.perf_counter()
    search = Search(objectives, everyone.nonzero()[0], LEAF, prior)
    ready = time.perf_counter() - t0
    picks = greedy(objectives, everyone, bench.picks, search=search)
    seconds = time.perf_counter() - t0
    row: dict[str, Any] = {
        "images": n, "earlier": bench.earlier, "setup_s": ready,
        "dim": bench.dim, "picks": len(picks), "select_s": seconds,
        "picks_per_s": len(picks) / seconds, "peak_rss_mb": _peak_mb(),
        "start_rss_mb": before, "stream": folder is not None,
        "vectors_mb": len(vectors) * bench.dim * (2 if folder else np.dtype(bench.dtype)
                                                  .itemsize) / 2**20,
        "synthetic_s": made, "data": "spread" if bench.spread else asdict(
            Synthetic(n, bench.dim, latent=bench.latent, noise=bench.noise,
                      shape=bench.shape, dtype=bench.dtype)),
        "distances": search.cover.scanned if search.cover else 0,
        "dropped": search.cover.changed if search.cover else 0}
    row["l1_gap_after"] = _gap(counts, [p.index for p in picks])
    row["l1_gap_input"] = _gap(counts, list(range(n)))
    if baseline:
        t0 = time.perf_counter()
        plain = plain_greedy(objectives, everyone, bench.picks, prior)
        row["plain_s"] = time.perf_counter() - t0
        row["speedup_over_plain"] = row["plain_s"] / seconds
        row["same_picks_as_plain"] = [p.index for p in plain] == [p.index for p in picks]
    return row


def _gap(counts: np.ndarray, chosen: list[int]) -> float:
    total = counts[chosen].sum(axis=0)
    return float(np.abs(total / max(total.sum(), 1.0) - TARGET).sum())


def bench_select(bench: SelectBench) -> dict[str, Any]:
    """One child process per size; the smallest-first order keeps a failure cheap."""
    sizes = sorted({*bench.sizes, bench.baseline_size} - {0})
    context = multiprocessing.get_context("spawn")
    rows = []
    for n in sizes:
        with tempfile.TemporaryDirectory(prefix="pretag-bench-select-") as folder:
            if bench.stream:
                with context.Pool(1) as pool:
                    made = pool.apply(_write_run, (n, bench, folder))
            with context.Pool(1) as pool:
                row = pool.apply(_one_size, (n, bench, n == bench.baseline_size,
                                             folder if bench.stream else None))
        if bench.stream:
            row["synthetic_s"] = made
        row["peak_over_vectors"] = row["peak_rss_mb"] / row["vectors_mb"]
        log.info("%d images: %d picks in %.1f s, peak %.0f MB (%.2fx the vectors)", n,
                 row["picks"], row["select_s"], row["peak_rss_mb"], row["peak_over_vectors"])
        rows.append(row)
    return {"rows": rows, "config": asdict(bench)}
