"""The selection report's embedding figures on a run's shards at scale: seconds and peak.

    python benchmarks/select_report.py [N] [PICKS]

Writes N synthetic 1280-d vectors (the scenes set) as a run's shards in a temporary folder,
then times ``figures`` on :class:`~pretag.selection.rows.ShardRows` over them with PICKS
random picks, and prints one JSON line (seconds, peak RSS before and after in MB).
"""

from __future__ import annotations

import json
import resource
import sys
import tempfile
import time

import numpy as np

from pretag.bench.select import SelectBench, _from_run, _write_run
from pretag.selection.report import _plot
from pretag.selection.report_embeddings import figures


def main(n: int, picks: int) -> None:
    with tempfile.TemporaryDirectory() as folder:
        _write_run(n, SelectBench(stream=True), folder)
        rows, _ = _from_run(folder)
        picked = np.sort(np.random.default_rng(0).choice(len(rows), picks, replace=False))
        start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        t0 = time.perf_counter()
        _, record = figures(_plot, rows, picked)
        seconds = time.perf_counter() - t0
    print(json.dumps({"images": n, "picks": picks, "figures_s": seconds,
                      "start_rss_mb": start,
                      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "retained_beside_removed": record["retained_beside_removed"][:2]}))


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 1_000_000,
         int(sys.argv[2]) if len(sys.argv) > 2 else 10_000)
