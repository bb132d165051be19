"""Nearest-centre distances for k-center greedy, exact, computed only where a new centre
can bring a row closer.

The rows are grouped twice, on a short sketch ``z`` of each: its coordinates on the top
principal components of a sample, plus the norm of what those leave over
(``|z_x - z_c| <= |x - c|``: the left-over parts are compared by their norms only). k-means
cells of about ``32 * leaf`` rows, each split again by k-means into leaves of about
``leaf`` rows. Every group keeps its mean ``mu`` and radius ``r`` in sketch space and the
largest current distance ``M`` of a member to its nearest centre. When a centre ``c`` is
added, no member of a group comes closer to ``c`` than ``|z_c - mu| - r`` (triangle
inequality), so every group with ``|z_c - mu| - r >= M`` is skipped, and the rows of the
leaves left get their exact distance to ``c``: each leaf is one faiss inverted list of
float16 rows (:class:`~pretag.selection.lists.Lists`), scanned at memory speed.

Until 2026-12 the rows of the leaves left were filtered once more by their own sketch
distance and the survivors gathered from a float32 array; on sets with isotropic noise that
filter let through ten rows for each one whose distance dropped (the noise lies outside the
sketch), and the gather ran at a fifth of scanning speed: on a 64-d mixture with 10% noise
it computed 14.6M distances for 1.35M that changed (benchmarks/RESULTS.md).

The picks are those of the plain loop that recomputes every distance after each pick (on
vectors spread evenly over the sphere nothing is skipped, and the loop is that plain scan).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from pretag.selection.lists import Lists, mean_of, rounding
from pretag.selection.rows import Rows, blocks, float32, squared_norms, take
from pretag.selection.rows import sample as sample_rows

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
    """Distances ``d`` of every row of ``x`` (float16 or float32 [N, D]) to its nearest
    centre (before the first centre: to the centroid). Positions handed in and out are
    positions in the grouped order: ``order[p]`` is the row of ``x`` at position ``p``.
    ``x`` is only read; the rows are kept as float16 in :attr:`lists`."""

    def __init__(self, x: Rows, leaf: int = LEAF, seed: int = 0) -> None:
        if x.dtype not in (np.float16, np.float32) or x.ndim != 2:
            raise ValueError("Cover needs a float16 or float32 array [rows, dimensions]")
        n = len(x)
        rng = np.random.default_rng(seed)
        z, self.sketch, middle, self.slack = sketch(x, rng)
        self.order, self.cells, self.leaves, self.first_leaf = _two_levels(z, leaf, rng)
        z = np.ascontiguousarray(z[self.order])
        self.levels = [_shape(z, self.cells), _shape(z, self.leaves)]
        del z
        self.lists = Lists(x, self.order, self.leaves)
        self.leaf_bounds = np.append(self.first_leaf, len(self.leaves))  # leaves of cell i
        self.leaf_ends = np.append(self.leaves[1:], n)
        self.scanned = 0  # rows whose distance to a new centre was computed (benchmark)
        self.changed = 0  # of those, rows whose distance dropped
        self._all_to(middle)
        self.first = True

    def _all_to(self, c: np.ndarray, centre: int | None = None) -> None:
        """Every distance replaced by that to ``c`` (the row at ``centre``, if one)."""
        self.d = self.lists.all_to(c)
        self.scanned += len(self.d)
        if centre is not None:
            self.d[centre] = 0.0
        self.leaf_max = np.maximum.reduceat(self.d, self.leaves)
        self.cell_max = np.maximum.reduceat(self.leaf_max, self.first_leaf)

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
        c = self.lists.row(position)
        if self.first:
            self.first = False
            self._all_to(c, position)
            return np.arange(len(self.d))
        self.d[position] = 0.0
        own = int(np.searchsorted(self.leaves, position, side="right")) - 1
        leaves = self._reachable(self.sketch.of(c[None])[0])
        at = int(np.searchsorted(leaves, own))  # leaves are sorted
        if at == len(leaves) or leaves[at] != own:  # rounding can leave out its own leaf
            leaves = np.insert(leaves, at, own)
        self.scanned += int((self.leaf_ends[leaves] - self.leaves[leaves]).sum())
        rows, new = self.lists.near(c, leaves, float(self.leaf_max[leaves].max()))
        better = new < self.d[rows]
        changed = rows[better]
        self.changed += len(changed)
        self.d[changed] = new[better]
        touched = np.unique(np.searchsorted(self.leaves, changed, side="right") - 1)
        touched = np.union1d(touched, [own])
        starts, seg = ranges(self.leaves[touched], self.leaf_ends[touched])
        self.leaf_max[touched] = np.maximum.reduceat(self.d[starts], seg)
        cells = np.searchsorted(self.first_leaf, touched, side="right") - 1
        cells = cells[np.append(True, np.diff(cells) > 0)]  # leaves are sorted
        inner, seg = ranges(self.leaf_bounds[cells], self.leaf_bounds[cells + 1])
        self.cell_max[cells] = np.maximum.reduceat(self.leaf_max[inner], seg)
        return np.append(changed, position)  # may hold the centre twice

    def _reachable(self, zc: np.ndarray) -> np.ndarray:
        """The leaves with a member that ``c`` may bring closer: cells, then their leaves."""
        cc = float(zc @ zc)
        mu, sq_mu, radius = self.levels[0]
        gap_sq = sq_mu + cc - 2.0 * (mu @ zc)
        cells = np.flatnonzero(gap_sq <= (self.cell_max + radius + self.slack) ** 2 + _SLACK)
        if not len(cells):
            return cells
        leaves, _ = ranges(self.leaf_bounds[cells], self.leaf_bounds[cells + 1])
        mu, sq_mu, radius = self.levels[1]
        gap_sq = sq_mu[leaves] + cc - 2.0 * (mu[leaves] @ zc)
        reach = self.leaf_max[leaves] + radius[leaves] + self.slack
        return leaves[gap_sq <= reach ** 2 + _SLACK]


#: Centre x row pairs up to which the nearest centre is found exactly (flat index); beyond,
#: an inverted-file index answers (about 1e11 multiply-adds at 1280 dimensions, a minute or
#: two on 2 cores, against hours for 1M x 1M exactly).
EXACT_PAIRS = 8 * 10**10 // 1280
_PROBES = 32


def nearest_distances(centres: np.ndarray, x: Rows,
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
    out = np.empty(len(x))
    for rows, block in blocks(x):  # float32 a block at a time (x may be float16)
        found, _ = index.search(np.ascontiguousarray(float32(block)), 1)
        out[rows] = np.sqrt(np.maximum(found[:, 0].astype(np.float64), 0.0))
    return out


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


@dataclass(frozen=True)
class Sketch:
    """The map from a row to its sketch: coordinates on ``basis``'s components, then the
    norm of the rest."""

    basis: np.ndarray  # [D, components + 1] float32: the components, then the sample mean
    shift: np.ndarray  # the mean's coordinates (its last entry is |mean|^2)

    def of(self, rows: np.ndarray) -> np.ndarray:
        """Sketches [n, components + 1] of float32 rows [n, D]."""
        block = rows @ self.basis
        centred_sq = (squared_norms(rows)
                      - 2.0 * block[:, -1] + self.shift[-1])
        block[:, :-1] -= self.shift[:-1]
        rest = centred_sq - np.einsum("ij,ij->i", block[:, :-1], block[:, :-1])
        block[:, -1] = np.sqrt(np.maximum(rest, 0.0))
        return block


def sketch(x: Rows, rng: np.random.Generator
           ) -> tuple[np.ndarray, Sketch, np.ndarray, float]:
    """(every row's sketch, the map, the centroid, the rounding slack), the components
    those of a sample of 4096 rows. The centroid is
    :func:`~pretag.selection.lists.centroid`'s, summed in the same pass; the slack is how
    far :class:`~pretag.selection.lists.Lists`'s float16 rounding moves a row
    (:func:`~pretag.selection.lists.rounding`), which the bounds add."""
    sample = float32(take(x, sample_rows(x, rng, 4096)))
    mean = sample.mean(axis=0)
    centred = sample - mean
    # randomised range finder: any orthonormal basis keeps the bound; a good one tightens it
    q, _ = np.linalg.qr(centred @ rng.standard_normal((x.shape[1], 2 * _COMPONENTS))
                        .astype(np.float32))
    _, _, vt = np.linalg.svd(q.T @ centred, full_matrices=False)
    basis = np.ascontiguousarray(np.concatenate([vt[:_COMPONENTS], mean[None]]).T)
    sk = Sketch(basis, mean @ basis)
    out = np.empty((len(x), basis.shape[1]), dtype=np.float32)
    total = np.zeros(x.shape[1])
    longest = 0.0
    for rows, given in blocks(x):
        block = float32(given)
        out[rows] = sk.of(block)
        total += block.sum(axis=0, dtype=np.float64)  # as centroid() sums
        if x.dtype != np.float16:
            longest = max(longest, float(np.sqrt(np.einsum("ij,ij->i", block, block).max())))
    return out, sk, mean_of(total, len(x)), rounding(x, longest)


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


def _shape(z: np.ndarray, starts: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mean, squared norm of the mean, radius) in sketch space of each group of the
    sketches ``z`` (in grouped order; groups start at ``starts``)."""
    sizes = np.diff(np.append(starts, len(z)))
    mu = _segment_means(z, starts).astype(np.float32)
    sq_mu = np.einsum("ij,ij->i", mu, mu, dtype=np.float64)
    own = np.repeat(np.arange(len(starts)), sizes)
    far = np.empty(len(z))
    for s in range(0, len(z), _CHUNK * 4):
        rows, m = z[s:s + _CHUNK * 4], mu[own[s:s + _CHUNK * 4]]
        far[s:s + _CHUNK * 4] = np.sqrt(np.einsum("ij,ij->i", rows - m, rows - m))
    return mu, sq_mu, np.maximum.reduceat(far, starts)


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
