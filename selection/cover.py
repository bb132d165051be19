"""Nearest-centre distances for k-center greedy, exact, with a two-stage filter that skips
most of the work.

Every row ``x`` gets a short sketch ``z``: its coordinates on the top principal components
of a sample, plus the norm of what those leave over. ``|z_x - z_c|`` never exceeds the true
distance ``|x - c|`` (the left-over parts are compared by their norms only), so it is a
lower bound that costs ``1 + components`` numbers a row instead of ``D``.

The sketches are split in two levels of cells: k-means cells of about ``32 * leaf`` rows,
each split again by k-means into leaves of about ``leaf`` rows. Every cell keeps its mean
``mu`` and radius ``r`` in sketch space and the largest current distance ``M`` of a member
to its nearest centre. When a centre ``c`` is added, no member of a cell comes closer to
``c`` than ``|z_c - mu| - r`` (triangle inequality), so every cell with ``|z_c - mu| - r > M``
is skipped; in the cells left, rows whose sketch distance is not below their current
distance are skipped; the rest get their exact distance from the full vectors. The picks are
those of the plain loop that recomputes every distance after each pick; the filter saves
time where the vectors have structure (on vectors spread evenly over the sphere nothing is
skipped).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

LEAF = 64
_COMPONENTS = 32
_CHUNK = 16384
_ROUNDS = 5
# float32 sketches: squared distances are compared with this margin to spare (their
# rounding error, mostly from the left-over norm, is about 1e-5; a square root near 0 would
# blow that up, so none is taken)
_SLACK = 2e-4


class Cover:
    """Distances ``d`` of every row of ``x`` to its nearest centre (before the first centre:
    to the centroid). Positions handed in and out are positions in the sketch order:
    ``order[p]`` is the row of ``x`` at position ``p``. ``x`` is only read."""

    def __init__(self, x: np.ndarray, leaf: int = LEAF, seed: int = 0) -> None:
        if x.dtype != np.float32 or not x.flags.c_contiguous:
            raise ValueError("Cover needs a C-contiguous float32 array")
        self.x = x
        n = len(x)
        rng = np.random.default_rng(seed)
        sq_x = _row_norms_sq(x)
        z = _sketch(x, sq_x, rng)
        self.order, self.cells, self.leaves, self.first_leaf = _two_levels(z, leaf, rng)
        self.z = np.ascontiguousarray(z[self.order])
        self.sq_x_rows = sq_x
        self.sq_x = sq_x[self.order]
        self.sq_z = np.einsum("ij,ij->i", self.z, self.z, dtype=np.float64)
        self.levels = [self._shape(self.cells), self._shape(self.leaves)]
        self.leaf_bounds = np.append(self.first_leaf, len(self.leaves))  # leaves of cell i
        self.leaf_ends = np.append(self.leaves[1:], n)
        self.scanned = 0  # rows whose sketch distance was computed, for the benchmark
        self.exact = 0  # rows whose full distance was computed
        self._all_to(x.mean(axis=0, dtype=np.float64).astype(np.float32))
        self.first = True

    def _all_to(self, c: np.ndarray, centre: int | None = None) -> None:
        """Every distance replaced by that to ``c`` (the row at ``centre``, if one)."""
        self.d = self._exact(np.arange(len(self.z)), c)
        if centre is not None:
            self.d[centre] = 0.0
        self.leaf_max = np.maximum.reduceat(self.d, self.leaves)
        self.cell_max = np.maximum.reduceat(self.leaf_max, self.first_leaf)

    def _shape(self, starts: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(mean, squared norm of the mean, radius) in sketch space of each cell."""
        sizes = np.diff(np.append(starts, len(self.z)))
        mu = _segment_means(self.z, starts).astype(np.float32)
        sq_mu = np.einsum("ij,ij->i", mu, mu, dtype=np.float64)
        own = np.repeat(np.arange(len(starts)), sizes)
        far = np.empty(len(self.z))
        for s in range(0, len(self.z), _CHUNK * 4):
            rows, m = self.z[s:s + _CHUNK * 4], mu[own[s:s + _CHUNK * 4]]
            far[s:s + _CHUNK * 4] = np.sqrt(np.einsum("ij,ij->i", rows - m, rows - m))
        return mu, sq_mu, np.maximum.reduceat(far, starts)

    def _exact(self, positions: np.ndarray, c: np.ndarray) -> np.ndarray:
        rows = self.order[positions]
        self.exact += len(rows)
        # gathering rows is 6x slower than scanning them: past an eighth, scan them all
        if len(rows) > len(self.x) // 8:
            return distances(self.x, self.sq_x_rows, c)[rows]
        ascending = np.argsort(rows)  # gathered in memory order: fewer cache misses
        out = np.empty(len(rows))
        out[ascending] = distances(self.x[rows[ascending]], self.sq_x[positions[ascending]], c)
        return out

    def max(self) -> float:
        return float(self.cell_max.max(initial=0.0))

    def seed(self, d: np.ndarray) -> None:
        """Start from centres chosen before this cover (a datapool's earlier picks): ``d``
        is each row of ``x``'s distance to the nearest of them, in row order. It replaces
        the distance to the centroid; centres added later only lower it."""
        self.d = np.asarray(d, np.float64)[self.order].copy()
        self.leaf_max = np.maximum.reduceat(self.d, self.leaves)
        self.cell_max = np.maximum.reduceat(self.leaf_max, self.first_leaf)
        self.first = False

    def add(self, position: int) -> np.ndarray:
        """Make the row at ``position`` a centre; returns the positions whose distance
        dropped, and the centre's (after the first centre: every position, its distance
        replacing the centroid's)."""
        c = self.x[self.order[position]]
        if self.first:
            self.first = False
            self._all_to(c, position)
            return np.arange(len(self.z))
        self.d[position] = 0.0
        zc = self.z[position]
        own = np.searchsorted(self.leaves, position, side="right") - 1
        leaves = self._reachable(zc)
        at = int(np.searchsorted(leaves, own))  # leaves are sorted
        if at == len(leaves) or leaves[at] != own:  # rounding can leave out its own leaf
            leaves = np.insert(leaves, at, own)
        rows, seg = ranges(self.leaves[leaves], self.leaf_ends[leaves])
        self.scanned += len(rows)
        if len(rows) > len(self.z) // 8:  # scanning all beats gathering this many
            low = (self.sq_z + float(zc @ zc) - 2.0 * (self.z @ zc))[rows]
        else:
            low = self.sq_z[rows] + float(zc @ zc) - 2.0 * (self.z[rows] @ zc)
        maybe = rows[low < self.d[rows] ** 2 + _SLACK]
        new = self._exact(maybe, c)
        better = new < self.d[maybe]
        changed = maybe[better]
        self.d[changed] = new[better]
        self.leaf_max[leaves] = np.maximum.reduceat(self.d[rows], seg)
        cells = np.searchsorted(self.first_leaf, leaves, side="right") - 1
        cells = cells[np.append(True, np.diff(cells) > 0)]  # leaves are sorted
        inner, seg = ranges(self.leaf_bounds[cells], self.leaf_bounds[cells + 1])
        self.cell_max[cells] = np.maximum.reduceat(self.leaf_max[inner], seg)
        return np.append(changed, position)  # may hold the centre twice

    def _reachable(self, zc: np.ndarray) -> np.ndarray:
        """The leaves with a member that ``c`` may bring closer: cells, then their leaves."""
        cc = float(zc @ zc)
        mu, sq_mu, radius = self.levels[0]
        gap_sq = sq_mu + cc - 2.0 * (mu @ zc)
        cells = np.flatnonzero(gap_sq <= (self.cell_max + radius) ** 2 + _SLACK)
        if not len(cells):
            return cells
        leaves, _ = ranges(self.leaf_bounds[cells], self.leaf_bounds[cells + 1])
        mu, sq_mu, radius = self.levels[1]
        gap_sq = sq_mu[leaves] + cc - 2.0 * (mu[leaves] @ zc)
        return leaves[gap_sq <= (self.leaf_max[leaves] + radius[leaves]) ** 2 + _SLACK]


#: Centre x row pairs up to which the nearest centre is found exactly (flat index); beyond,
#: an inverted-file index answers (about 1e11 multiply-adds at 1280 dimensions, a minute or
#: two on 2 cores, against hours for 1M x 1M exactly).
EXACT_PAIRS = 8 * 10**10 // 1280
_PROBES = 32


def nearest_distances(centres: np.ndarray, x: np.ndarray,
                      exact_pairs: int = EXACT_PAIRS) -> np.ndarray:
    """Each row of ``x``'s Euclidean distance to its nearest row of ``centres``, with faiss,
    computed once for a datapool's earlier picks, however many there are (not per pick).
    Exact (flat index: blocks of BLAS products) while ``len(centres) * len(x) * dim``
    stays under ``exact_pairs * 1280``; beyond, an inverted-file index (``4 sqrt(k)``
    lists of the centres, the nearest 32 searched) gives the distance to the nearest
    centre it finds: never below the true one, equal to it for most rows
    (benchmarks/RESULTS.md)."""
    import faiss

    centres = np.ascontiguousarray(centres, np.float32)
    x = np.ascontiguousarray(x, np.float32)
    dim = centres.shape[1]
    index: Any
    if len(centres) * len(x) * dim <= exact_pairs * 1280:
        index = faiss.IndexFlatL2(dim)
    else:
        lists = max(1, int(4 * np.sqrt(len(centres))))
        index = faiss.IndexIVFFlat(faiss.IndexFlatL2(dim), dim, lists)
        rng = np.random.default_rng(0)
        sample = np.sort(rng.choice(len(centres), min(len(centres), 40 * lists),
                                    replace=False))
        index.train(centres[sample])
        index.nprobe = min(_PROBES, lists)
        log.info("nearest of %d earlier picks for %d samples: inverted file, %d lists, %d "
                 "searched", len(centres), len(x), lists, index.nprobe)
    index.add(centres)
    found, _ = index.search(x, 1)
    return np.sqrt(np.maximum(found[:, 0].astype(np.float64), 0.0))


def mean_neighbour_distance(x: np.ndarray, k: int, exact_pairs: int = EXACT_PAIRS
                            ) -> np.ndarray:
    """Each row's mean Euclidean distance to its ``k`` nearest other rows (faiss; exact up
    to the same bound as :func:`nearest_distances`, an inverted file beyond)."""
    import faiss

    x = np.ascontiguousarray(x, np.float32)
    n, dim = x.shape
    k = min(k, n - 1)
    if k < 1:
        return np.zeros(n)
    index: Any
    if n * n * dim <= exact_pairs * 1280:
        index = faiss.IndexFlatL2(dim)
    else:
        lists = max(1, int(4 * np.sqrt(n)))
        index = faiss.IndexIVFFlat(faiss.IndexFlatL2(dim), dim, lists)
        sample = np.sort(np.random.default_rng(0).choice(n, min(n, 40 * lists), replace=False))
        index.train(x[sample])
        index.nprobe = min(_PROBES, lists)
    index.add(x)
    found, ids = index.search(x, k + 1)
    d = np.sqrt(np.maximum(found.astype(np.float64), 0.0))
    own = ids == np.arange(n)[:, None]  # each row finds itself (or a copy at distance 0)
    d[own] = np.nan
    keep = np.where(own.any(axis=1, keepdims=True), d, np.pad(d[:, :k], ((0, 0), (0, 1)),
                                                              constant_values=np.nan))
    return np.nanmean(keep, axis=1)


def distances(x: np.ndarray, sq_x: np.ndarray, c: np.ndarray) -> np.ndarray:
    """Euclidean distances of the rows of ``x`` (squared norms ``sq_x``) to ``c``. einsum,
    not BLAS: BLAS sums a row in another order depending on how many rows come with it,
    and the same row must get the same distance in a block as in the whole array."""
    dots = np.einsum("ij,j->i", x, c)
    return np.sqrt(np.maximum(sq_x + float(np.dot(c, c)) - 2.0 * dots, 0.0))


def _sketch(x: np.ndarray, sq_x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """[coordinates on the top principal components of a sample, norm of the rest]."""
    sample = x[np.sort(rng.choice(len(x), min(len(x), 4096), replace=False))]
    mean = sample.mean(axis=0)
    centred = sample - mean
    # randomised range finder: any orthonormal basis keeps the bound; a good one tightens it
    q, _ = np.linalg.qr(centred @ rng.standard_normal((x.shape[1], 2 * _COMPONENTS))
                        .astype(np.float32))
    _, _, vt = np.linalg.svd(q.T @ centred, full_matrices=False)
    basis = np.ascontiguousarray(np.concatenate([vt[:_COMPONENTS], mean[None]]).T)
    shift = mean @ basis  # coordinates of the mean; its last entry is |mean|^2
    out = np.empty((len(x), basis.shape[1]), dtype=np.float32)
    for s in range(0, len(x), _CHUNK * 4):
        block = out[s:s + _CHUNK * 4]
        np.matmul(x[s:s + _CHUNK * 4], basis, out=block)
        centred_sq = sq_x[s:s + _CHUNK * 4] - 2.0 * block[:, -1] + shift[-1]
        block[:, :-1] -= shift[:-1]
        rest = centred_sq - np.einsum("ij,ij->i", block[:, :-1], block[:, :-1])
        block[:, -1] = np.sqrt(np.maximum(rest, 0.0))
    return out


def _two_levels(z: np.ndarray, leaf: int, rng: np.random.Generator
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(row order, first position of each cell, first position of each leaf, first leaf of
    each cell): k-means cells of about 32 leaves, each split by k-means into leaves (k-means
    follows the clusters that median splits would cut through: 5x fewer rows scanned)."""
    cell_of = _kmeans(z, -(-len(z) // (32 * leaf)), rng)
    order = np.argsort(cell_of, kind="stable")
    cell_sizes = np.bincount(cell_of)
    cell_sizes = cell_sizes[cell_sizes > 0]
    leaves: list[np.ndarray] = []
    first_leaf = []
    start = count = 0
    for size in cell_sizes.tolist():
        rows = order[start:start + size]
        sub = _kmeans(z[rows], -(-size // leaf), rng)
        order[start:start + size] = rows[np.argsort(sub, kind="stable")]
        sizes = np.bincount(sub)
        sizes = sizes[sizes > 0]
        first_leaf.append(count)
        leaves.append(start + np.concatenate([[0], np.cumsum(sizes)[:-1]]))
        count += len(sizes)
        start += size
    cells = np.concatenate([[0], np.cumsum(cell_sizes)[:-1]]).astype(np.intp)
    return (order, cells, np.concatenate(leaves).astype(np.intp),
            np.array(first_leaf, dtype=np.intp))


def _segment_means(a: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """Mean of the rows of each segment (segments start at ``starts`` and tile ``a``),
    reduced along contiguous memory (``np.add.reduceat`` down the rows is 10x slower)."""
    sums = np.add.reduceat(np.ascontiguousarray(a.T), starts, axis=1).T
    return sums / np.diff(np.append(starts, len(a)))[:, None]


def _kmeans(p: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """Cluster of each row: Lloyd's k-means (a few rounds) on a sample of the rows."""
    if k <= 1 or len(p) <= k:
        return np.arange(len(p)) if len(p) <= k else np.zeros(len(p), dtype=np.intp)
    sample = p[rng.choice(len(p), min(len(p), 32 * k), replace=False)]
    centres = sample[:k].copy()
    for _ in range(_ROUNDS):
        nearest = _nearest(sample, centres)
        members = (nearest[:, None] == np.arange(k)).astype(np.float32)
        counts = members.sum(axis=0)
        sums = members.T @ sample
        filled = counts > 0
        centres[filled] = sums[filled] / counts[filled, None]
    return _nearest(p, centres)


def _nearest(p: np.ndarray, centres: np.ndarray) -> np.ndarray:
    out = np.empty(len(p), dtype=np.intp)
    sq = np.einsum("ij,ij->i", centres, centres)
    for s in range(0, len(p), _CHUNK):
        out[s:s + _CHUNK] = np.argmin(sq - 2.0 * (p[s:s + _CHUNK] @ centres.T), axis=1)
    return out


def ranges(starts: np.ndarray, ends: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The integers of the ranges [starts, ends) one after another, and where each begins."""
    sizes = ends - starts
    seg = np.cumsum(sizes) - sizes
    return np.repeat(starts - seg, sizes) + np.arange(int(sizes.sum())), seg


def _row_norms_sq(x: np.ndarray) -> np.ndarray:
    out = np.empty(len(x))
    for s in range(0, len(x), _CHUNK * 4):
        block = x[s:s + _CHUNK * 4]
        out[s:s + _CHUNK * 4] = np.einsum("ij,ij->i", block, block, dtype=np.float64)
    return out
