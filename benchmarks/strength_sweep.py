"""BALANCE beside DIVERSITY: how BALANCE's strength trades the L1 gap to the target against
the covering radius (the largest distance from a candidate to its nearest pick, unit
vectors), on the benchmark's synthetic sets and on a real run (coco128 through YOLOX).

Each set: DIVERSITY alone, BALANCE alone, then DIVERSITY (strength 1) with BALANCE at each
strength of the sweep, with today's balance objective and with the rule used before
2026-12 (min-max scaling with samples without objects one L1 unit below the worst, kept
here only to measure the change). The target is the seed example's (car 0.5, the six other
classes 0.05-0.1).

    python benchmarks/strength_sweep.py [--run DIR] [--n 20000] [--picks 1000] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

import pretag.selection.greedy as greedy_module
from pretag.bench.select import TARGET, Synthetic, synthetic
from pretag.selection.config import Strategy
from pretag.selection.cover import nearest_distances
from pretag.selection.greedy import Objective, greedy
from pretag.selection.rows import normalise

STRENGTHS = (0.1, 0.25, 0.5, 1.0, 2.0, 4.0)


def legacy_balance_values(gain: np.ndarray, empty: np.ndarray, live: np.ndarray
                          ) -> np.ndarray:
    """The balance objective before 2026-12 (for comparison only)."""
    gain = gain.copy()
    filled = live & ~empty
    if filled.any():
        gain[empty] = float(gain[filled].min()) - 1.0
    low = float(gain[live].min(initial=np.inf))
    high = float(gain[live].max(initial=-np.inf))
    return (gain - low) / (high - low) if high > low else np.ones_like(gain)


def gap(counts: np.ndarray, chosen: list[int]) -> float:
    total = counts[chosen].sum(axis=0)
    return float(np.abs(total / max(total.sum(), 1.0) - TARGET).sum())


def one_set(name: str, vectors: np.ndarray, counts: np.ndarray, picks: int
            ) -> dict[str, Any]:
    unit = normalise(vectors.copy())
    everyone = np.ones(len(unit), dtype=bool)

    def run(objectives: list[Objective]) -> dict[str, float]:
        chosen = [p.index for p in greedy(objectives, everyone, picks)]
        return {"gap": gap(counts, chosen),
                "radius": float(nearest_distances(unit[chosen], unit).max())}

    diversity = Objective(Strategy("DIVERSITY"), "diversity", unit)

    def balance(strength: float) -> Objective:
        return Objective(Strategy("BALANCE", strength=strength), "balance", counts, TARGET)

    row: dict[str, Any] = {"set": name, "samples": len(unit), "picks": picks,
                           "input_gap": gap(counts, list(range(len(unit)))),
                           "diversity_alone": run([diversity]),
                           "balance_alone": run([balance(1.0)])}
    current = greedy_module.balance_values
    rules: dict[str, Callable[..., np.ndarray]] = {"now": current,
                                                   "before": legacy_balance_values}
    for rule, values in rules.items():
        greedy_module.balance_values = values
        try:
            row[rule] = {str(s): run([diversity, balance(s)]) for s in STRENGTHS}
        finally:
            greedy_module.balance_values = current
    return row


def figure(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4), layout="constrained")
    for k, row in enumerate(rows):
        colour = f"C{k}"
        for rule, style in (("now", "-o"), ("before", ":x")):
            gaps = [row[rule][str(s)]["gap"] for s in STRENGTHS]
            radii = [row[rule][str(s)]["radius"] / row["diversity_alone"]["radius"]
                     for s in STRENGTHS]
            label = f"{row['set']} ({rule})"
            left.plot(STRENGTHS, gaps, style, color=colour, label=label)
            right.plot(STRENGTHS, radii, style, color=colour, label=label)
        left.axhline(row["input_gap"], color=colour, lw=0.6, ls="--")
    for ax in (left, right):
        ax.set_xscale("log")
        ax.set_xlabel("BALANCE strength (DIVERSITY at 1)")
    left.set_ylabel("L1 gap to the target (dashed: the whole input)")
    right.set_ylabel("covering radius / DIVERSITY alone's")
    left.legend(fontsize=7)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, help="a pretag run folder with image vectors")
    parser.add_argument("--n", type=int, default=20_000)
    parser.add_argument("--picks", type=int, default=1000)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/selection"))
    args = parser.parse_args()
    sets = [("synthetic 24-d latent, 5% noise", Synthetic(args.n, 256)),
            ("synthetic 64-d latent, 10% noise", Synthetic(args.n, 256, latent=64,
                                                           noise=0.1))]
    rows = []
    for name, spec in sets:
        start = time.perf_counter()
        rows.append(one_set(name, *synthetic(spec), args.picks))
        print(f"{name}: {time.perf_counter() - start:.1f} s", flush=True)
    if args.run is not None:
        from pretag.selection.run import image_samples

        samples = image_samples(args.run, {})
        assert samples.vectors is not None, "the run holds no image vectors"
        assert samples.classes == ["bicycle", "bus", "car", "motorcycle", "person", "train",
                                   "truck"], samples.classes
        rows.append(one_set(f"{args.run.name} (real)", samples.vectors, samples.counts,
                            min(30, len(samples.names) // 4)))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "strength_sweep.json").write_text(json.dumps(rows, indent=1) + "\n")
    figure(rows, args.out / "strength_sweep.png")
    for row in rows:
        print(json.dumps({k: row[k] for k in ("set", "input_gap", "diversity_alone",
                                              "balance_alone")}))
        for rule in ("now", "before"):
            print(f"  {rule}: " + "  ".join(f"{s}: {v['gap']:.3f}/{v['radius']:.3f}"
                                            for s, v in row[rule].items()))


if __name__ == "__main__":
    main()
