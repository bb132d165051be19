"""Near duplicates: images whose vectors lie within a cosine distance of each other, found
with faiss after the run and written as ``report/near_duplicates.json``.

The default distance, 0.02, was chosen on real copies (benchmarks/RESULTS.md, "Data
health"): with YOLOX-Nano's image vectors, 94-99% of re-encoded (JPEG q70), half-size,
8-px-shifted and 90%-cropped copies of coco128 and the driving frames lie within it of their
original, and no two distinct images of those 139 do (the closest distinct pair: 0.028).
Another model's vectors need their own value (``--near-duplicate-distance``).

Up to :data:`EXACT_MAX` (50k) vectors the search is exact (faiss ``IndexFlatIP``); beyond, an
inverted file (``IndexIVFFlat``, ``nlist`` about 2 sqrt(N), ``nprobe`` 16) trained on a
sample of 40 vectors a cell, which may miss a pair whose vectors fall in cells not probed.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from pretag.job.health import group_summary
from pretag.job.outputs import write_atomic
from pretag.job.storage import AnyPath

log = logging.getLogger(__name__)

DEFAULT_DISTANCE = 0.02
EXACT_MAX = 50_000
_BLOCK = 16_384  # queries per faiss call: bounds the result buffers


@dataclass(frozen=True)
class NearDuplicates:
    pairs: list[tuple[int, int, float]]  # (i, j, cosine distance), i < j
    groups: list[list[int]]  # connected pairs, each sorted, groups by their first

    def to_json(self, names: Sequence[str], distance: float, exact: bool) -> dict[str, Any]:
        groups = sorted((sorted(names[i] for i in g) for g in self.groups),
                        key=lambda g: g[0])
        return {"distance": distance, "exact": exact, "images": len(names),
                "pairs": sorted([*sorted((names[i], names[j])), round(d, 6)]
                                for i, j, d in self.pairs),
                **group_summary(groups)}


def _index(vectors: np.ndarray) -> tuple[Any, bool]:
    import faiss

    count, dim = vectors.shape
    index: Any
    if count <= EXACT_MAX:
        index = faiss.IndexFlatIP(dim)
        index.add(vectors)
        return index, True
    nlist = int(2 * math.sqrt(count))
    index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
    sample = np.random.default_rng(0).choice(count, min(count, 40 * nlist), replace=False)
    index.train(vectors[np.sort(sample)])
    index.add(vectors)
    index.nprobe = 16
    return index, False


def find(vectors: np.ndarray, distance: float = DEFAULT_DISTANCE) -> tuple[NearDuplicates, bool]:
    """Pairs of unit ``vectors`` (float32 [N, D]) within ``distance`` (1 - cosine), and
    the groups they join; and whether the search was exact."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    vectors = vectors / np.maximum(norms, 1e-12)
    if len(vectors) < 2:
        return NearDuplicates([], []), True
    index, exact = _index(vectors)
    pairs: list[tuple[int, int, float]] = []
    for start in range(0, len(vectors), _BLOCK):
        lims, sims, ids = index.range_search(vectors[start:start + _BLOCK], 1.0 - distance)
        for row in range(len(lims) - 1):
            i = start + row
            for sim, j in zip(sims[lims[row]:lims[row + 1]], ids[lims[row]:lims[row + 1]],
                              strict=True):
                if j > i:
                    pairs.append((i, int(j), max(0.0, 1.0 - float(sim))))
    return NearDuplicates(pairs, _groups(len(vectors), pairs)), exact


def _groups(count: int, pairs: list[tuple[int, int, float]]) -> list[list[int]]:
    parent = list(range(count))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, j, _ in pairs:
        a, b = root(i), root(j)
        if a != b:
            parent[max(a, b)] = min(a, b)
    members: dict[int, list[int]] = {}
    for i in sorted({i for p in pairs for i in p[:2]}):
        members.setdefault(root(i), []).append(i)
    return [sorted(g) for g in members.values() if len(g) > 1]


def write_near_duplicates(report_dir: AnyPath, names: Sequence[str], vectors: np.ndarray,
                          distance: float = DEFAULT_DISTANCE) -> dict[str, Any]:
    """Find them among ``names`` (their unit vectors in the same order) and write
    ``report/near_duplicates.json``; returns what was written."""
    found, exact = find(vectors, distance)
    data = found.to_json(names, distance, exact)
    write_atomic(report_dir / "near_duplicates.json", json.dumps(data, indent=1) + "\n")
    log.info("near duplicates (cosine distance <= %g): %d pairs in %d groups", distance,
             len(found.pairs), len(found.groups))
    return data
