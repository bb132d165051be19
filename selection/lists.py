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

from pretag.selection.rows import Rows, blocks, float16, float32

#: rows per list when the caller has no grouping of its own (:func:`plain_lists`)
PLAIN_LIST = 4096


class Lists:
    """Rows ``x[order]`` (float16, or float32 rounded to float16 by
    :func:`~pretag.selection.rows.float16`), list ``i`` holding
    positions ``starts[i]`` to the next start. Positions are the rows' places in
    ``order``. ``x`` is only read, a block at a time (:func:`~pretag.selection.rows.blocks`):
    a numpy array, or a run's shards (:class:`~pretag.selection.rows.ShardRows`).

    The rows live in one numpy buffer laid out as faiss serialises the index, which
    faiss then reads in place (``ZeroCopyIOReader``): the lists are views of the buffer,
    so the rows are held once, and filled block by block from a source that need not be
    in memory (:func:`layout`)."""

    def __init__(self, x: Rows, order: np.ndarray, starts: np.ndarray) -> None:
        import faiss

        n, dim = len(x), int(x.shape[1])
        self.n, self.dim = n, dim
        self.starts = np.asarray(starts, np.int64)
        self.ends = np.append(self.starts[1:], n).astype(np.int64)
        sizes = self.ends - self.starts
        self.buffer, lead, codes_at = layout(dim, sizes)
        # each position's first value in the buffer, counted in float16 values
        self.at = np.repeat(codes_at // 2 - self.starts * dim, self.ends - self.starts)
        self.at += np.arange(n, dtype=np.int64) * dim
        self._fill(x, order, codes_at + sizes * 2 * dim)
        stream = self.buffer[lead:]
        io = cast(Any, faiss)  # the stubs lack the zero-copy reader
        self._reader = io.ZeroCopyIOReader(faiss.swig_ptr(stream), stream.size)
        self.index: Any = io.read_index(self._reader, faiss.IO_FLAG_MMAP_IFC)
        self.index.parallel_mode = 1  # one query: the threads share its lists
        self.all = np.arange(len(self.starts), dtype=np.int64)

    def _fill(self, x: Rows, order: np.ndarray, ids_at: np.ndarray) -> None:
        """Each row of ``x`` to its place, a block at a time; each list's ids (its
        positions)."""
        n, dim = self.n, self.dim
        place = np.empty(n, np.int64)
        place[np.asarray(order, np.int64)] = self.at  # row -> where its values go
        values = self.buffer[:self.buffer.size // 2 * 2].view(np.float16)
        rows = np.lib.stride_tricks.as_strided(values, (max(len(values) - dim + 1, 0), dim),
                                               (2, 2), writeable=True)
        for numbers, block in blocks(x):
            rows[place[numbers]] = float16(block)
        for i, (s, e) in enumerate(zip(self.starts.tolist(), self.ends.tolist(),
                                       strict=True)):
            at = int(ids_at[i])
            self.buffer[at:at + 8 * (e - s)] = np.arange(s, e, dtype=np.int64).view(np.uint8)

    def take(self, positions: np.ndarray) -> np.ndarray:
        """The stored rows at ``positions``, float16 [len(positions), D]."""
        values = self.buffer[:self.buffer.size // 2 * 2].view(np.float16)
        rows = np.lib.stride_tricks.as_strided(values, (max(len(values) - self.dim + 1, 0),
                                                        self.dim), (2, 2), writeable=False)
        return rows[self.at[np.asarray(positions, np.int64)]]

    def row(self, position: int) -> np.ndarray:
        """The stored row at ``position``, as float32."""
        at = int(self.at[position])
        return self.buffer[2 * at:2 * (at + self.dim)].view(np.float16).astype(np.float32)

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


def layout(dim: int, sizes: np.ndarray) -> tuple[np.ndarray, int, np.ndarray]:
    """(buffer, where the index starts in it, where each list's codes start): an
    uninitialised uint8 buffer holding an ``IndexIVFScalarQuantizer`` (QT_fp16, ``dim``,
    one list per size) as ``faiss.serialize_index`` writes it, less the lists' contents.
    The header is faiss's own (an empty index's); the lists follow in faiss's
    ``ilar``/``full`` format (``write_InvertedLists``): per list with rows, its codes then
    its int64 ids. The index starts a few bytes in, so that the first codes are 64-byte
    aligned in the buffer (and every code at an even offset). Untouched pages cost no
    memory until filled."""
    import faiss

    sizes = np.asarray(sizes, np.int64)
    empty = faiss.IndexIVFScalarQuantizer(faiss.IndexFlatL2(dim), dim, max(len(sizes), 1),
                                          faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_L2,
                                          False)
    empty.is_trained = True
    empty.ntotal = int(sizes.sum())
    stream = np.asarray(faiss.serialize_index(empty)).tobytes()
    tail = 4 + 8 + 8 + 4 + 8  # an empty index's lists: ilar, nlist, code size, sprs, []
    if stream[-tail:-tail + 4] != b"ilar":
        raise RuntimeError("faiss wrote an index layout pretag does not know")
    code_size = 2 * dim
    head = (stream[:-tail] + b"ilar" + np.array([max(len(sizes), 1), code_size], "<u8")
            .tobytes() + b"full" + np.array([max(len(sizes), 1)], "<u8").tobytes()
            + np.append(sizes, [0] * (len(sizes) == 0)).astype("<u8").tobytes())
    lead = -len(head) % 64
    spans = sizes * (code_size + 8)
    codes_at = lead + len(head) + np.concatenate([[0], np.cumsum(spans)[:-1]]).astype(np.int64)
    buffer = np.empty(lead + len(head) + int(spans.sum()), np.uint8)
    buffer[lead:lead + len(head)] = np.frombuffer(head, np.uint8)
    return buffer, lead, codes_at


def plain_lists(x: Rows) -> Lists:
    """``x``'s rows in their own order, in lists of :data:`PLAIN_LIST` (for loops that
    compute every distance: the plain loop, the Ray actors)."""
    return Lists(x, np.arange(len(x)), np.arange(0, max(len(x), 1), PLAIN_LIST))


def centroid(x: Rows) -> np.ndarray:
    """The mean row (float64 sums of each of :func:`~pretag.selection.rows.blocks`), as
    float32: the first centre's stand-in. :func:`pretag.selection.cover.sketch` computes
    the same sums in its own pass over the rows."""
    return mean_of(row_sum(x), len(x))


def row_sum(x: Rows) -> np.ndarray:
    """The float64 sum of the rows (:func:`centroid`'s; the Ray actors add theirs)."""
    total = np.zeros(x.shape[1])
    for _, block in blocks(x):
        total += float32(block).sum(axis=0, dtype=np.float64)
    return total


def mean_of(total: np.ndarray, n: int) -> np.ndarray:
    return (total / max(n, 1)).astype(np.float32)


def rounding(x: Rows, largest_norm: float) -> float:
    """How far a row of ``x`` (rows no longer than ``largest_norm``) can move when
    :class:`Lists` rounds it to float16: none for float16; else half a float16 ulp of
    every value (2^-11 relative), doubled for the values near the subnormal range."""
    return 0.0 if x.dtype == np.float16 else 2.0 ** -10 * largest_norm + 1e-6
