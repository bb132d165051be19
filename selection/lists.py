"""Vectors as float16 in faiss inverted lists, and the one distance kernel every
selection loop uses.

k-center greedy spends its time on Euclidean distances from a new centre to the rows it may
bring closer. numpy gathers scattered rows at a fifth of its scanning speed and converts
float16 at about 0.4 G values/s here; faiss's inverted-file scanner reads float16 codes list
by list and computes the distances with SIMD at 16-25 G values/s on this machine's two
cores (benchmarks/RESULTS.md, "The loop on float16 lists"). So the rows live in an
``IndexIVFScalarQuantizer`` with ``QT_fp16`` codes (the float16 values themselves, 2 bytes
a value), each list a run of positions that a caller chose to be near each other, and a
query names the lists to scan. The fast loop, the plain loop and the Ray actors all compute
distances here, so a row gets the same distance whichever way it is reached (faiss sums
one row's differences in a fixed order).
"""

from __future__ import annotations

from typing import Any, cast

import numpy as np

#: rows per list when the caller has no grouping of its own (:func:`plain_lists`)
PLAIN_LIST = 4096
#: rows made float32 at a time by the passes over every row
BLOCK = 65536


class Lists:
    """Rows ``x[order]`` (float16, or float32 rounded to float16), list ``i`` holding
    positions ``starts[i]`` to the next start. Positions are the rows' places in
    ``order``. ``x`` is only read."""

    def __init__(self, x: np.ndarray, order: np.ndarray, starts: np.ndarray) -> None:
        import faiss

        n, dim = x.shape
        self.n, self.dim = n, dim
        self.starts = np.asarray(starts, np.int64)
        self.ends = np.append(self.starts[1:], n).astype(np.int64)
        self._quantizer = faiss.IndexFlatL2(dim)  # never searched: the lists are named
        self.index: Any = faiss.IndexIVFScalarQuantizer(
            self._quantizer, dim, len(self.starts), faiss.ScalarQuantizer.QT_fp16,
            faiss.METRIC_L2, False)
        self.index.is_trained = True
        self.index.parallel_mode = 1  # one query: the threads share its lists
        self.invlists = cast(Any, self.index.invlists)
        # one buffer for every list's rows: an allocation per list would be a fresh mapping
        # each time (about 8 us a page to touch on these machines)
        longest = int((self.ends - self.starts).max(initial=0))
        gathered = np.empty((longest, dim), x.dtype)
        rows = np.empty((longest, dim), np.float16)
        ids = np.arange(n, dtype=np.int64)
        for i, (s, e) in enumerate(zip(self.starts.tolist(), self.ends.tolist(),
                                       strict=True)):
            np.take(x, order[s:e], axis=0, out=gathered[:e - s], mode="clip")  # unbuffered
            rows[:e - s] = gathered[:e - s]
            self.invlists.add_entries(i, e - s, faiss.swig_ptr(ids[s:e]),
                                      faiss.swig_ptr(rows[:e - s].view(np.uint8)))
        self.index.ntotal = n
        self.all = np.arange(len(self.starts), dtype=np.int64)

    def row(self, position: int) -> np.ndarray:
        """The stored row at ``position``, as float32."""
        import faiss

        i = int(np.searchsorted(self.starts, position, side="right")) - 1
        size = int(self.ends[i] - self.starts[i])
        codes = faiss.rev_swig_ptr(self.invlists.get_codes(i), size * self.dim * 2)
        at = (position - int(self.starts[i])) * self.dim * 2
        return codes[at:at + self.dim * 2].view(np.float16).astype(np.float32)

    def near(self, c: np.ndarray, lists: np.ndarray, below: float = np.inf
             ) -> tuple[np.ndarray, np.ndarray]:
        """(positions, distances) of the rows of ``lists`` closer to ``c`` than ``below``
        (Euclidean, float64 from faiss's float32 squared distances)."""
        import faiss

        keys = np.ascontiguousarray(lists, dtype=np.int64).reshape(1, -1)
        if not keys.shape[1]:
            return np.zeros(0, np.int64), np.zeros(0)
        query = np.ascontiguousarray(c, dtype=np.float32).reshape(1, -1)
        coarse = np.zeros(keys.shape, np.float32)
        # squared, widened by a float32 ulp or two so that nothing closer is left out
        radius = float(np.inf if not np.isfinite(below) else below * below * (1 + 1e-6))
        result: Any = faiss.RangeSearchResult(1)
        self.index.nprobe = keys.shape[1]
        self.index.range_search_preassigned_c(1, faiss.swig_ptr(query), radius,
                                              faiss.swig_ptr(keys), faiss.swig_ptr(coarse),
                                              result)
        found = int(faiss.rev_swig_ptr(result.lims, 2)[1])
        positions = faiss.rev_swig_ptr(result.labels, found).copy()
        squared = faiss.rev_swig_ptr(result.distances, found).astype(np.float64)
        return positions, np.sqrt(np.maximum(squared, 0.0))

    def all_to(self, c: np.ndarray) -> np.ndarray:
        """Every position's distance to ``c``."""
        positions, dist = self.near(c, self.all)
        out = np.empty(self.n)
        out[positions] = dist
        return out


def plain_lists(x: np.ndarray) -> Lists:
    """``x``'s rows in their own order, in lists of :data:`PLAIN_LIST` (for loops that
    compute every distance: the plain loop, the Ray actors)."""
    return Lists(x, np.arange(len(x)), np.arange(0, max(len(x), 1), PLAIN_LIST))


def centroid(x: np.ndarray) -> np.ndarray:
    """The mean row (float64 sums of :data:`BLOCK` rows at a time, in row order), as
    float32: the first centre's stand-in. :func:`pretag.selection.cover.sketch` computes
    the same sums in its own pass over the rows."""
    return mean_of(row_sum(x), len(x))


def row_sum(x: np.ndarray) -> np.ndarray:
    """The float64 sum of the rows (:func:`centroid`'s; the Ray actors add theirs)."""
    total = np.zeros(x.shape[1])
    for s in range(0, len(x), BLOCK):
        total += np.asarray(x[s:s + BLOCK], np.float32).sum(axis=0, dtype=np.float64)
    return total


def mean_of(total: np.ndarray, n: int) -> np.ndarray:
    return (total / max(n, 1)).astype(np.float32)


def rounding(x: np.ndarray, largest_norm: float) -> float:
    """How far a row of ``x`` (rows no longer than ``largest_norm``) can move when
    :class:`Lists` rounds it to float16: none for float16; else half a float16 ulp of
    every value (2^-11 relative), doubled for the values near the subnormal range."""
    return 0.0 if x.dtype == np.float16 else 2.0 ** -10 * largest_norm + 1e-6
