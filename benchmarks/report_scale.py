"""The selection report (pretag.selection.report.write_report) at scale: N samples over
the seven classes with D-dimensional float16 vectors, P picks and E images left out (corrupt
and duplicates, each with a reason). The first picks and the first excluded samples are
coco128's images, so every thumbnail grid is full; the rest of the names are made up.
Reports the seconds, the peak RSS of this process and the sizes of report.html and
report.json: the page's bound at N inputs.

    python benchmarks/report_scale.py [N] [P] [E]
"""

from __future__ import annotations

import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from pretag.selection.report import write_report
from pretag.selection.samples import Samples

CLASSES = ["bicycle", "bus", "car", "motorcycle", "person", "train", "truck"]


def main(count: int, picks: int, left_out: int, dim: int = 64) -> dict[str, float]:
    shared = Path(os.environ.get("PRETAG_SHARED", "../shared"))
    images = shared / "data" / "coco128" / "images"
    real = sorted(p.name for p in images.glob("*.jpg"))
    rng = np.random.default_rng(0)
    names = real + [f"drive_{i // 1000:04d}/frame_{i:07d}.jpg"
                    for i in range(count - len(real))]
    counts = rng.poisson(1.5, size=(count, len(CLASSES))).astype(np.int32)
    vectors = rng.normal(size=(count, dim)).astype(np.float16)
    samples = Samples(names, CLASSES, counts, [np.zeros(0)] * count, vectors, {})
    picked = [*range(48), *rng.choice(np.arange(len(real), count), picks - 48,
                                      replace=False).tolist()]
    excluded = {names[48 + i]: "exact duplicate of " + names[i] for i in range(40)}
    excluded |= {names[i]: "corrupt: uniformRowRatio 0.4"
                 for i in range(len(real), len(real) + left_out - 40)}
    target = {"car": 0.3, "person": 0.3}
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        write_report(Path(tmp), Path(tmp), samples, picked, target, images, None, excluded)
        seconds = time.perf_counter() - start
        page = (Path(tmp) / "report" / "report.html").stat().st_size
        record = (Path(tmp) / "report" / "report.json").stat().st_size
    return {"samples": count, "picks": picks, "excluded": left_out,
            "seconds": round(seconds, 1), "page_MB": round(page / 1e6, 2),
            "report_json_KB": round(record / 1e3, 1),
            "peak_rss_GB": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 2)}


if __name__ == "__main__":
    args = [int(a) for a in sys.argv[1:]]
    print(json.dumps(main(*(args or [1_000_000, 10_000, 50_000]))))
