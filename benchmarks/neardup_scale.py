"""The near-duplicate search (pretag.job.neardup) at scale: N synthetic image vectors of D
dimensions (float32, unit; clustered around N/100 centres so that neighbours are close, as a
fleet's frames are), 1% of them planted as near copies (noise of cosine distance ~0.005) of
others. Reports the seconds, the peak RSS of this process and how many planted pairs were
found (the inverted file used beyond 50k vectors may miss some).

    python benchmarks/neardup_scale.py [N] [D]
"""

from __future__ import annotations

import json
import resource
import sys
import time

import numpy as np

from pretag.job import neardup


def synthetic(count: int, dim: int, seed: int = 0) -> tuple[np.ndarray, set[tuple[int, int]]]:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(max(1, count // 100), dim)).astype(np.float32)
    vectors = centres[rng.integers(0, len(centres), count)]
    vectors += rng.normal(scale=0.6, size=vectors.shape).astype(np.float32)  # spread
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    planted = count // 100
    sources = rng.choice(count - planted, planted, replace=False)
    copies = vectors[sources] + rng.normal(scale=0.1 / np.sqrt(dim),
                                           size=(planted, dim)).astype(np.float32)
    vectors[count - planted:] = copies / np.linalg.norm(copies, axis=1, keepdims=True)
    return vectors, {(int(s), count - planted + i) for i, s in enumerate(sources)}


def main() -> None:
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 1_000_000
    dim = int(sys.argv[2]) if len(sys.argv) > 2 else 448
    start = time.perf_counter()
    vectors, planted = synthetic(count, dim)
    made = time.perf_counter() - start
    start = time.perf_counter()
    found, exact = neardup.find(vectors, neardup.DEFAULT_DISTANCE)
    seconds = time.perf_counter() - start
    pairs = {(i, j) for i, j, _ in found.pairs}
    print(json.dumps({"vectors": count, "dim": dim, "exact": exact,
                      "seconds_making": round(made, 1), "seconds_search": round(seconds, 1),
                      "vectors_mb": round(vectors.nbytes / 2**20),
                      "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                                           / 1024),
                      "planted_pairs": len(planted), "planted_found": len(pairs & planted),
                      "other_pairs": len(pairs - planted)}))


if __name__ == "__main__":
    main()
