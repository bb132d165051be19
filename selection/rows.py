"""Vectors for the selection: a numpy array, or a run's Parquet shards read when asked for.

The selection reads its vectors in a few ways only: every row once, a block at a time in
any order (:func:`blocks`: the sketch pass, filling the faiss lists, the centroid, the
datapool's nearest earlier picks), some rows by number (:func:`take`), and the rows of a
subset of the samples (:func:`subset`). :class:`ShardRows` does these from the shards
themselves, so ``pretag select`` holds the vectors once, in the loop's float16 lists,
instead of once as loaded and again there (benchmarks/RESULTS.md, "Holding the vectors
once"). Code that needs the whole array at once (TYPICALITY, sequences) calls
``np.asarray`` on it, which reads every shard.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, TypeAlias

import numpy as np

from pretag.job.storage import AnyPath
from pretag.job.vectors import VectorError, not_finite, read_vectors, vector_names

TINY = 1e-12  # an objective of 0 counts as this (its logarithm is finite)
#: rows made float32 at a time by the passes over every row (42 MB at 1280-d, a block and
#: the next one being made: 84 MB beside the rows, 3.5% of them at 1M)
BLOCK = 8192


def float32(block: np.ndarray) -> np.ndarray:
    """``block`` [n, D] as float32: float16 through faiss's SIMD decoder (the same values
    as numpy's cast, 3x faster here: 1.3 G values/s), anything else through numpy (a
    view when it is float32 already)."""
    if block.dtype != np.float16 or block.ndim != 2 or not len(block):
        return np.asarray(block, np.float32)
    import faiss

    decoder = faiss.ScalarQuantizer(block.shape[1], faiss.ScalarQuantizer.QT_fp16)
    codes = np.ascontiguousarray(block).view(np.uint8)
    return np.asarray(decoder.decode(codes)).reshape(block.shape)


def squared_norms(rows: np.ndarray) -> np.ndarray:
    """Each row's squared norm, summed in float64 (einsum casts its whole input to float64
    first: 2048 rows at a time keep that copy at 21 MB for 1280-d rows)."""
    out = np.empty(len(rows))
    for s in range(0, len(rows), 2048):
        part = rows[s:s + 2048]
        out[s:s + 2048] = np.einsum("ij,ij->i", part, part, dtype=np.float64)
    return out


def float16(block: np.ndarray) -> np.ndarray:
    """``block`` [n, D] as float16: float32 through faiss's SIMD encoder (5x numpy's
    cast here; a value halfway between two float16 rounds away from zero, where numpy
    rounds to even), a float16 array as it is."""
    if block.dtype == np.float16 or block.ndim != 2 or not len(block):
        return np.asarray(block, np.float16)
    import faiss

    encoder = faiss.ScalarQuantizer(block.shape[1], faiss.ScalarQuantizer.QT_fp16)
    rows = np.ascontiguousarray(block, np.float32)
    return np.asarray(encoder.compute_codes(rows)).view(np.float16).reshape(block.shape)


def unit_block(block: np.ndarray) -> np.ndarray:
    """Float32 L2-normalised rows of ``block`` (in place when it is float32)."""
    out = float32(block)
    if not out.flags.writeable:  # Arrow's float32 values, read in place
        out = out.copy()
    norms = np.sqrt(squared_norms(out))
    out /= np.maximum(norms, TINY)[:, None].astype(np.float32)
    return out


def normalise(vectors: np.ndarray) -> np.ndarray:
    """L2-normalised rows (as Lightly normalises embeddings by default). A float16 or
    float32 array is normalised in place, in chunks computed in float32, so 1M x 1280 needs
    no second copy (float16 stays float16, as the run stores it); anything else becomes
    float32."""
    keep = vectors.dtype in (np.float16, np.float32) and vectors.flags.c_contiguous
    out = vectors if keep else np.ascontiguousarray(vectors, dtype=np.float32)
    for s in range(0, len(out), BLOCK):
        block = unit_block(out[s:s + BLOCK])  # float32: a view, in place
        if out.dtype != np.float32:
            out[s:s + BLOCK] = block
    return out


class ShardRows:
    """A run's image vectors, L2-normalised rows ``[N, D]`` (float32 blocks computed from
    the float16 stored), read from its Parquet shards when asked for: row ``i`` is stored
    row ``stored[i]`` (shard ``k`` holding stored rows ``bounds[k]`` to ``bounds[k + 1]``).
    Holds the last shard read."""

    dtype = np.dtype(np.float32)
    ndim = 2

    def __init__(self, paths: Sequence[AnyPath], bounds: np.ndarray, dim: int,
                 stored: np.ndarray) -> None:
        self.paths, self.bounds, self.dim = list(paths), np.asarray(bounds, np.int64), dim
        self.stored = np.asarray(stored, np.int64)
        self._cached: tuple[int, np.ndarray] | None = None

    @classmethod
    def of_run(cls, paths: Sequence[AnyPath], names: Sequence[str]) -> ShardRows:
        """The rows of ``names`` in the shards ``paths`` (their filename columns are read
        now, the vectors later); :class:`VectorError` for a name no shard holds."""
        where: dict[str, int] = {}
        bounds, dim = [0], None
        for path in paths:
            shard_names, dim = vector_names(path, dim)
            where.update((n, bounds[-1] + i) for i, n in enumerate(shard_names))
            bounds.append(bounds[-1] + len(shard_names))
        missing = [n for n in names if n not in where]
        if missing:
            raise VectorError(f"{len(missing)} images have no stored vector (e.g. "
                              f"{missing[0]}); run pretag run again")
        return cls(paths, np.array(bounds), dim or 0,
                   np.array([where[n] for n in names], np.int64))

    @property
    def shape(self) -> tuple[int, int]:
        return len(self.stored), self.dim

    def __len__(self) -> int:
        return len(self.stored)

    def subset(self, rows: np.ndarray) -> ShardRows:
        return ShardRows(self.paths, self.bounds, self.dim, self.stored[rows])

    def __getitem__(self, key: Any) -> np.ndarray:
        """Rows by number, slice or bool mask, as a float32 array (one row: 1-D)."""
        if isinstance(key, (int, np.integer)):
            return self.take(np.array([int(key)]))[0]
        return self.take(np.arange(len(self))[key])

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        """Every row, float16 unless asked for another type (half of float32's memory)."""
        return self.take(np.arange(len(self)), np.float16 if dtype is None else dtype)

    def take(self, rows: np.ndarray, dtype: Any = np.float32) -> np.ndarray:
        """Rows ``rows`` (numbers into this array), each shard read once."""
        stored = self.stored[np.asarray(rows, np.int64)]
        out = np.empty((len(stored), self.dim), dtype)
        shard = np.searchsorted(self.bounds, stored, side="right") - 1
        by_shard = np.argsort(shard, kind="stable")
        cuts = np.flatnonzero(np.diff(shard[by_shard])) + 1
        for group in np.split(by_shard, cuts) if len(by_shard) else []:
            k = int(shard[group[0]])
            out[group] = self._shard(k)[stored[group] - self.bounds[k]]
        return out

    def blocks(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(row numbers, rows) of every row once, shard by shard in stored order, the
        shards' rows gathered into blocks of about :data:`BLOCK`."""
        row_of = np.full(int(self.bounds[-1]), -1, np.int64)
        row_of[self.stored] = np.arange(len(self.stored))
        # rows of each shard that are rows here (an empty shard counts 0)
        kept = np.diff(np.concatenate([[0], np.cumsum(row_of >= 0)])[self.bounds])
        first = 0
        while first < len(self.paths):
            last = first + 1  # shards first..last-1 make the next block
            while last < len(self.paths) and kept[first:last].sum() < BLOCK:
                last += 1
            numbers = row_of[self.bounds[first]:self.bounds[last]]
            numbers = numbers[numbers >= 0]
            out = np.empty((len(numbers), self.dim), np.float32)
            at = 0
            for k in range(first, last):  # every shard read: a damaged one is refused
                keep = np.flatnonzero(row_of[self.bounds[k]:self.bounds[k + 1]] >= 0)
                out[at:at + len(keep)] = self._shard(k)[keep]
                at += len(keep)
            if len(numbers):
                yield numbers, out
            first = last

    def sample(self, rng: np.random.Generator, count: int) -> np.ndarray:
        """About ``count`` row numbers drawn from the rows of 16 shards drawn at random
        (so that a sample reads 16 shards, not every one)."""
        shard = np.searchsorted(self.bounds, self.stored, side="right") - 1
        present = np.unique(shard)
        chosen = rng.choice(present, min(len(present), 16), replace=False)
        pool = np.flatnonzero(np.isin(shard, chosen))
        return np.sort(rng.choice(pool, min(len(pool), count), replace=False))

    def _shard(self, k: int) -> np.ndarray:
        if self._cached is None or self._cached[0] != k:
            _, stored = read_vectors(self.paths[k], self.dim, None, check=False)
            block = unit_block(stored)
            bad = int((~np.isfinite(block)).any(axis=1).sum())
            if bad:
                raise not_finite(self.paths[k], bad)
            self._cached = (k, block)
        return self._cached[1]


Rows: TypeAlias = np.ndarray | ShardRows


def blocks(x: Rows) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(row numbers, rows) of every row of ``x`` once: an array's in order, :data:`BLOCK`
    at a time (views), a :class:`ShardRows`'s shard by shard."""
    if isinstance(x, ShardRows):
        yield from x.blocks()
        return
    for s in range(0, len(x), BLOCK):
        yield np.arange(s, min(s + BLOCK, len(x))), x[s:s + BLOCK]


def take(x: Rows, rows: np.ndarray) -> np.ndarray:
    """Rows of ``x`` by number, as an array."""
    return x.take(rows) if isinstance(x, ShardRows) else x[rows]


def sample(x: Rows, rng: np.random.Generator, count: int) -> np.ndarray:
    """Up to ``count`` sorted row numbers of ``x`` drawn at random (a
    :class:`ShardRows`'s from a few shards: :meth:`ShardRows.sample`)."""
    if isinstance(x, ShardRows):
        return x.sample(rng, count)
    return np.sort(rng.choice(len(x), min(len(x), count), replace=False))


def subset(x: Rows, rows: np.ndarray) -> Rows:
    """``x[rows]`` as the same kind: an array's as a view when the rows are one run (no
    copy of 1M vectors), a :class:`ShardRows`'s without reading anything."""
    if isinstance(x, ShardRows):
        return x.subset(rows)
    if len(rows) and rows[-1] - rows[0] == len(rows) - 1 and np.all(np.diff(rows) == 1):
        return x[int(rows[0]):int(rows[-1]) + 1]
    return x[rows]


def unit(x: Rows) -> Rows:
    """``x`` L2-normalised (an array in place; a :class:`ShardRows` reads unit rows)."""
    return x if isinstance(x, ShardRows) else normalise(x)
