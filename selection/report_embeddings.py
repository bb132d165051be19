"""The selection report's embedding figures: a PCA map with the picks highlighted, the
nearest-neighbour and pairwise distance distributions before and after (Lightly's
``distance_distr_before.png`` / ``_after.png``, log scale), and each of the first picks
beside its nearest sample that was not selected ("retained beside removed").

Bounds: the map and the nearest-neighbour histogram use at most :data:`MAX_POINTS` evenly
spaced samples; the pairwise histograms at most :data:`MAX_PAIRWISE_POINTS` samples
(about two million pairs); the retained/removed pairs search all samples for the first
:data:`MAX_RETAINED` picks only, so the cost is bounded whatever the run's size. One pass
over the rows gathers the rows drawn, the centroid and those pairs (a run's shards are read
once, not held: :class:`~pretag.selection.rows.ShardRows`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from pretag.selection.lists import mean_of
from pretag.selection.rows import Rows, blocks, float32, take, unit

MAX_POINTS = 4000
MAX_PAIRWISE_POINTS = 2000
MAX_RETAINED = 6

Plot = Callable[..., bytes]


def subset(n: int, limit: int = MAX_POINTS) -> np.ndarray:
    """At most ``limit`` evenly spaced rows of ``n``."""
    return np.linspace(0, n - 1, min(n, limit)).astype(int) if n else np.zeros(0, int)


def _gram_distances(unit: np.ndarray) -> np.ndarray:
    return np.sqrt(np.maximum(2 - 2 * unit @ unit.T, 0))


def nn_distances(unit: np.ndarray) -> np.ndarray:
    """Each row's distance to its nearest other row (rows normalised)."""
    if len(unit) < 2:
        return np.zeros(0)
    d = _gram_distances(unit)
    np.fill_diagonal(d, np.inf)
    return d.min(axis=1)


def pairwise_distances(unit: np.ndarray) -> np.ndarray:
    """The distances of every pair of rows (upper triangle, rows normalised)."""
    if len(unit) < 2:
        return np.zeros(0)
    d = _gram_distances(unit)
    return d[np.triu_indices(len(unit), k=1)]


def summary(values: np.ndarray) -> dict[str, float]:
    """Median and 5th/95th percentiles (zeros for no values)."""
    if not len(values):
        return {"median": 0.0, "p5": 0.0, "p95": 0.0}
    p5, median, p95 = np.percentile(values, [5, 50, 95])
    return {"median": float(median), "p5": float(p5), "p95": float(p95)}


def retained_beside_removed(unit: Rows, picked: np.ndarray,
                            limit: int = MAX_RETAINED) -> list[tuple[int, int, float]]:
    """For the first ``limit`` picks, the nearest sample that was not selected and its
    distance: (picked row, removed row, distance), nearest pairs first."""
    return one_pass(unit, picked, np.zeros(0, np.intp), limit)[2]


def one_pass(unit: Rows, picked: np.ndarray, drawn: np.ndarray, limit: int = MAX_RETAINED
             ) -> tuple[np.ndarray, np.ndarray, list[tuple[int, int, float]]]:
    """(the centroid, the rows ``drawn`` (sorted) as float32, :func:`retained_beside_removed`'s
    pairs), every row read once, a block at a time (a run's shards once)."""
    first = picked[:limit] if len(picked) < len(unit) else picked[:0]
    mine = float32(take(unit, first)) if len(first) else np.zeros((0, unit.shape[1]))
    kept = np.zeros(len(unit), dtype=bool)
    kept[picked] = True
    best = np.full(len(first), np.inf)
    best_row = np.zeros(len(first), dtype=int)
    gathered = np.zeros((len(drawn), unit.shape[1]), np.float32)
    total = np.zeros(unit.shape[1])
    for numbers, given in blocks(unit):
        block = float32(given)
        total += block.sum(axis=0, dtype=np.float64)  # as lists.centroid sums
        at = np.searchsorted(drawn, numbers)
        hit = (at < len(drawn)) & (drawn[np.minimum(at, len(drawn) - 1)] == numbers) \
            if len(drawn) else np.zeros(len(numbers), dtype=bool)
        gathered[at[hit]] = block[hit]
        out = ~kept[numbers]
        rows = numbers[out]
        if not len(rows) or not len(first):
            continue
        d2 = np.maximum(2 - 2 * mine @ block[out].T, 0)
        near = d2.argmin(axis=1)
        value = d2[np.arange(len(first)), near]
        better = (value < best) | ((value == best) & (rows[near] < best_row))
        best[better], best_row[better] = value[better], rows[near[better]]
    pairs = [(int(p), int(r), float(np.sqrt(v))) for p, r, v in zip(first, best_row, best,
                                                                     strict=True)]
    return (mean_of(total, len(unit)), gathered,
            sorted(pairs, key=lambda pair: pair[2]))


def figures(plot: Plot, vectors: Rows, picked: np.ndarray,
            earlier: np.ndarray | None = None) -> tuple[dict[str, bytes], dict[str, Any]]:
    """The PNGs (``map``, ``nearest``, ``distance_distr_before``, ``distance_distr_after``)
    and report.json's figures (median nearest-neighbour distances, pairwise summaries,
    retained/removed pairs as rows)."""
    x = unit(vectors)  # in place; only the rows drawn are made float32
    shown = subset(len(x))
    wanted = [shown, picked, picked[subset(len(picked))], subset(len(x), MAX_PAIRWISE_POINTS),
              picked[subset(len(picked), MAX_PAIRWISE_POINTS)]]
    before_picks = np.zeros(0, np.intp) if earlier is None else earlier
    drawn = np.unique(np.concatenate([*wanted, before_picks])).astype(np.intp)
    mean, gathered, retained = one_pass(x, picked, drawn)  # one read of every row

    def rows(at: np.ndarray) -> np.ndarray:
        return gathered[np.searchsorted(drawn, at)]

    _, _, axes = np.linalg.svd(rows(shown) - mean, full_matrices=False)
    xy = np.zeros((len(x), 2), np.float32)  # only the rows drawn are filled
    xy[drawn] = (gathered - mean) @ axes[:2].T
    before = nn_distances(rows(shown))
    after = nn_distances(rows(wanted[2]))
    pair_before = pairwise_distances(rows(wanted[3]))
    pair_after = pairwise_distances(rows(wanted[4]))

    def scatter(ax: Any) -> None:
        ax.scatter(xy[shown, 0], xy[shown, 1], s=6, c="#b0b0b0", label="all")
        if earlier is not None and len(earlier):
            ax.scatter(xy[earlier, 0], xy[earlier, 1], s=14, c="#1f77b4",
                       label="picked before")
        ax.scatter(xy[picked, 0], xy[picked, 1], s=14, c="#d62728", label="selected")
        ax.set_title("embeddings, first two principal components")
        ax.legend()

    def nearest(ax: Any) -> None:
        bins = np.linspace(0, max(before.max(initial=0), after.max(initial=0), 1e-6), 30)
        ax.hist(before, bins=bins, alpha=0.6, label="before", color="#7f7f7f")
        ax.hist(after, bins=bins, alpha=0.6, label="after", color="#d62728")
        ax.set_xlabel("distance to the nearest neighbour (normalised embeddings)")
        ax.legend()

    def distribution(values: np.ndarray, title: str, colour: str) -> Callable[[Any], None]:
        def draw(ax: Any) -> None:
            ax.hist(values, bins=np.linspace(0, 2, 41), color=colour, log=len(values) > 0)
            ax.set_xlabel("pairwise distance (normalised embeddings)")
            ax.set_ylabel("pairs (log scale)")
            ax.set_title(f"pairwise distances {title}: {len(values)} pairs")
        return draw

    pngs = {"map": plot(scatter, (6.4, 5.0)), "nearest": plot(nearest),
            "distance_distr_before": plot(distribution(pair_before, "before", "#7f7f7f")),
            "distance_distr_after": plot(distribution(pair_after, "after", "#d62728"))}
    record = {"median_nearest_neighbour_distance": {
                  "before": summary(before)["median"], "after": summary(after)["median"]},
              "pairwise_distance": {"before": summary(pair_before),
                                    "after": summary(pair_after)},
              "retained_beside_removed": retained}
    return pngs, record
