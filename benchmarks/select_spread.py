"""The selection loop's worst case: vectors spread evenly over the sphere, where no cell or
leaf can be skipped and every pick scans every row. Measures, per size, the loop's
seconds per pick (``pretag bench select --spread``, DIVERSITY + BALANCE, float16) beside
the bound it should meet: one scan of the float16 rows per pick that returns every row
(:meth:`pretag.selection.lists.Lists.all_to` over lists of the loop's leaf size, timed on
the same machine in the same run; a pick returns at most that), plus the per-pick
bookkeeping measured on a structured set of the same size.

    python benchmarks/select_spread.py OUT.json [OUT.png] [--sizes 50000,100000,...]
        [--picks 1000] [--dim 1280]

The figure plots both against N; the bound for 1M x 10k picks is printed and in the JSON.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from pretag.bench.select import SelectBench, bench_select
from pretag.selection.cover import LEAF
from pretag.selection.lists import Lists


def scan_rate(n: int, dim: int, rounds: int = 20) -> float:
    """Values per second of the dearest scan a pick can make: every row of ``n`` x ``dim``
    float16 rows in lists of :data:`~pretag.selection.cover.LEAF` rows (as the loop holds
    them) scanned and returned with its distance (:meth:`Lists.all_to`)."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, dim), dtype=np.float32).astype(np.float16)
    lists = Lists(x, np.arange(n), np.arange(0, n, LEAF))
    c = lists.row(0)
    lists.all_to(c)
    start = time.perf_counter()
    for _ in range(rounds):
        lists.all_to(c)
    return rounds * n * dim / (time.perf_counter() - start)


def main(out: Path, figure: Path | None, sizes: list[int], picks: int, dim: int
         ) -> dict[str, Any]:
    rate = scan_rate(min(sizes[-1], 200_000), dim)
    rows = []
    for n in sizes:
        bench = SelectBench((n,), picks, dim, 0, spread=True)
        spread = bench_select(bench)["rows"][0]
        easy = bench_select(replace(bench, spread=False))["rows"][0]
        loop = (spread["select_s"] - spread["setup_s"]) / spread["picks"]
        other = (easy["select_s"] - easy["setup_s"]) / easy["picks"]
        scan = n * dim / rate
        rows.append({"images": n, "picks": picks, "spread_ms_per_pick": 1e3 * loop,
                     "scan_ms_per_pick": 1e3 * scan, "bound_ms_per_pick": 1e3 * (scan + other),
                     "structured_ms_per_pick": 1e3 * other, "spread_setup_s": spread["setup_s"],
                     "spread_peak_rss_mb": spread["peak_rss_mb"]})
    per_row = (rows[-1]["bound_ms_per_pick"] / 1e3) / sizes[-1]
    result = {"scan_values_per_s": rate, "dim": dim, "rows": rows,
              "bound_1m_10k_picks_s": 10_000 * per_row * 1_000_000}
    out.write_text(json.dumps(result, indent=1))
    if figure is not None:
        _plot(result, figure)
    return result


def _plot(result: dict[str, Any], figure: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    n = [r["images"] for r in rows]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ax.plot(n, [r["spread_ms_per_pick"] for r in rows], "o-", color="#d62728",
            label="spread over the sphere (measured)")
    ax.plot(n, [r["bound_ms_per_pick"] for r in rows], "--", color="#7f7f7f",
            label="bound: one float16 scan + bookkeeping")
    ax.plot(n, [r["structured_ms_per_pick"] for r in rows], "s-", color="#1f77b4",
            label="scenes, 24-d latent, 5% noise")
    ax.set_xlabel("images")
    ax.set_ylabel("ms per pick (DIVERSITY + BALANCE)")
    ax.set_title(f"worst case: every pick scans every row ({result['dim']}-d)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(figure, dpi=110)


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    flags = dict(a[2:].split("=", 1) for a in sys.argv[1:] if a.startswith("--"))
    print(json.dumps(main(Path(args[0]), Path(args[1]) if len(args) > 1 else None,
                          [int(s) for s in flags.get("sizes", "50000,100000,200000,400000")
                           .split(",")], int(flags.get("picks", "1000")),
                          int(flags.get("dim", "1280")))["bound_1m_10k_picks_s"]))
