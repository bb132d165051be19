"""TYPICALITY's nearest neighbours (pretag.selection.cover.mean_neighbour_distance, faiss)
at scale: exact (IndexFlatL2) against the inverted file pretag uses beyond its exact bound
(4 sqrt(N) cells, nprobe 32), on N vectors of D values from ``pretag bench select``'s
generator (24-d latent, 5% noise), k = 20 (Lightly's default num_nearest_neighbors).

Prints, per size: seconds and peak RSS of each method run, and for the inverted file the
error against exact (relative error of each row's mean neighbour distance; overlap of the
1% most typical rows, the ones a TYPICALITY selection picks first).

    python benchmarks/typicality_scale.py N [D] [--exact]
"""

from __future__ import annotations

import json
import resource
import sys
import time

import numpy as np

from pretag.bench.select import Synthetic, synthetic
from pretag.selection.cover import mean_neighbour_distance


def timed(x: np.ndarray, exact: bool) -> tuple[np.ndarray, float]:
    start = time.perf_counter()
    values = mean_neighbour_distance(x, 20, exact_pairs=10**18 if exact else 0)
    return values, time.perf_counter() - start


def main(n: int, dim: int, exact: bool) -> dict[str, object]:
    x, _ = synthetic(Synthetic(n, dim))
    ivf, ivf_s = timed(x, False)
    row: dict[str, object] = {"samples": n, "dim": dim, "ivf_s": round(ivf_s, 1),
                              "peak_rss_gb_after_ivf": round(
                                  resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 2)}
    if exact:
        flat, flat_s = timed(x, True)
        error = np.abs(ivf - flat) / np.maximum(flat, 1e-12)
        top = max(1, n // 100)
        best_ivf = set(np.argsort(ivf)[:top].tolist())  # smallest distance: most typical
        best_flat = set(np.argsort(flat)[:top].tolist())
        row.update(exact_s=round(flat_s, 1), median_rel_error=float(np.median(error)),
                   p99_rel_error=float(np.percentile(error, 99)),
                   rows_exact=float((error < 1e-6).mean()),
                   top1pct_overlap=len(best_ivf & best_flat) / top)
    return row


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    print(json.dumps(main(int(args[0]), int(args[1]) if len(args) > 1 else 448,
                          "--exact" in sys.argv)))
