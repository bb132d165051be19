"""The selection loop that scales (sketch filter, per-group balance, block argmax) against
the plain loop that recomputes every sample after each pick: the same picks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from pretag.bench.select import Synthetic, objectives_for, synthetic
from pretag.cli import main
from pretag.selection.config import Strategy
from pretag.selection.cover import Cover, sketch
from pretag.selection.greedy import Objective, greedy
from pretag.selection.lists import Lists, centroid, plain_lists
from pretag.selection.reference import plain_greedy
from pretag.selection.rows import normalise


def _indices(picks: list) -> list[int]:
    return [p.index for p in picks]


@pytest.mark.parametrize("n, leaf", [(300, 64), (5000, 16), (12000, 64)])
def test_same_picks_as_the_plain_loop(n: int, leaf: int):
    vectors, counts = synthetic(Synthetic(n, dim=96, seed=n))
    objectives = objectives_for(vectors, counts)
    everyone = np.ones(n, dtype=bool)
    fast = greedy(objectives, everyone, 400, leaf=leaf)
    plain = plain_greedy(objectives, everyone, 400)
    assert _indices(fast) == _indices(plain)
    # the recorded objective values too, up to float32 rounding of the dot products (BLAS
    # sums a gathered block and the whole array in different orders)
    for a, b in zip(fast, plain, strict=True):
        assert a.objectives == pytest.approx(b.objectives, rel=1e-4, abs=1e-9)


def test_same_picks_with_weights_threshold_strengths_and_stopping():
    n = 6000
    vectors, counts = synthetic(Synthetic(n, dim=64, seed=3))
    rng = np.random.default_rng(4)
    candidates = rng.random(n) > 0.3  # what a THRESHOLD left
    objectives = [
        Objective(Strategy("DIVERSITY", strength=2.0, minimum_distance=0.25), "diversity",
                  vectors),
        Objective(Strategy("WEIGHTS", strength=0.5), "weights", rng.random(n)),
        Objective(Strategy("BALANCE"), "balance", counts,
                  np.array([0.1, 0.1, 0.5, 0.1, 0.1, 0.05, 0.05])),
        Objective(Strategy("BALANCE", strength=0.3), "balance",
                  np.eye(2)[rng.integers(0, 2, n)], np.array([0.5, 0.5]))]
    fast = greedy(objectives, candidates, 3000)
    plain = plain_greedy(objectives, candidates, 3000)
    assert _indices(fast) == _indices(plain)
    assert 0 < len(fast) < 3000  # stopped at the minimum distance
    assert all(candidates[i] for i in _indices(fast)) and len(set(_indices(fast))) == len(fast)


def test_earlier_picks_enter_once_and_the_loops_still_agree():
    """A datapool's earlier picks: centres and counts from the start, never picked again;
    the fast loop (one nearest-centre search for all of them) picks what the plain one
    does, and farther from the earlier picks than a selection without them."""
    n = 6000
    vectors, counts = synthetic(Synthetic(n, dim=64, seed=7))
    objectives = objectives_for(vectors, counts)
    rng = np.random.default_rng(8)
    prior = np.sort(rng.choice(n, 1500, replace=False))
    candidates = np.ones(n, dtype=bool)
    candidates[prior] = False
    fast = greedy(objectives, candidates, 300, prior=prior)
    plain = plain_greedy(objectives, candidates, 300, prior=prior)
    assert _indices(fast) == _indices(plain)
    assert not set(_indices(fast)) & set(prior.tolist())
    blind = greedy(objectives, candidates, 300)

    def gap(picks: list) -> float:
        x = objectives[0].data
        d = np.sqrt(np.maximum(2 - 2 * x[_indices(picks)] @ x[prior].T, 0)).min(axis=1)
        return float(np.median(d))

    assert gap(fast) > gap(blind)


def test_balance_alone_ties_go_to_the_lower_index():
    counts = np.repeat(np.eye(3), [50, 30, 20], axis=0)[::-1].copy()  # many equal rows
    objectives = [Objective(Strategy("BALANCE", distribution="UNIFORM"), "balance", counts,
                            np.full(3, 1 / 3))]
    everyone = np.ones(100, dtype=bool)
    assert _indices(greedy(objectives, everyone, 60)) == _indices(
        plain_greedy(objectives, everyone, 60))


def test_sketch_distance_is_a_lower_bound_and_cover_leaves_the_vectors_alone():
    rng = np.random.default_rng(5)
    vectors = normalise(rng.standard_normal((3000, 200)) * np.linspace(3, 0.1, 200))
    before = vectors.copy()
    z, _, middle, slack = sketch(vectors, np.random.default_rng(0))
    assert np.array_equal(middle, centroid(vectors))
    pairs = rng.integers(0, 3000, (2000, 2))
    exact = np.linalg.norm(vectors[pairs[:, 0]] - vectors[pairs[:, 1]], axis=1)
    low = np.linalg.norm(z[pairs[:, 0]] - z[pairs[:, 1]], axis=1)
    assert np.all(low <= exact + 1e-5) and np.median(low / np.maximum(exact, 1e-9)) > 0.5
    # the lists round float32 rows to float16: no row moves further than the slack
    stored = vectors.astype(np.float16).astype(np.float32)  # what the distances are of
    moved = np.linalg.norm(stored - vectors, axis=1)
    assert np.all(moved <= slack) and slack < 2e-3
    assert sketch(stored.astype(np.float16), np.random.default_rng(0))[3] == 0.0
    cover = Cover(vectors, leaf=32)
    assert sorted(cover.order.tolist()) == list(range(3000))
    assert np.array_equal(vectors, before)
    # the leaves hold the rows as float16, in the cover's order
    assert np.array_equal(cover.lists.row(17), stored[cover.order[17]])


def test_lists_give_a_row_the_same_distance_in_any_list_and_match_numpy():
    rng = np.random.default_rng(2)
    x = normalise(rng.standard_normal((5000, 96)).astype(np.float16))
    assert x.dtype == np.float16  # normalised in place, still float16
    order = rng.permutation(5000)
    grouped, plain = Lists(x, order, np.arange(0, 5000, 37)), plain_lists(x)
    c = plain.row(11)
    assert np.array_equal(grouped.all_to(c), plain.all_to(c)[order])
    numpy = np.linalg.norm(x.astype(np.float64) - c, axis=1)
    assert np.allclose(plain.all_to(c), numpy, rtol=1e-5, atol=1e-6)
    positions, dist = grouped.near(c, np.array([0, 5, 9]), below=1.3)
    inside = np.concatenate([np.arange(s, s + 37) for s in (0, 185, 333)])
    want = inside[grouped.all_to(c)[inside] < 1.3]
    assert sorted(positions.tolist()) == sorted(want.tolist()) and np.all(dist < 1.3 + 1e-6)


def test_bench_select_command(tmp_path: Path):
    out = tmp_path / "select.json"
    assert main(["bench", "select", "--sizes", "3000", "--picks", "150", "--dim", "64",
                 "--baseline-size", "2000", "--output", str(out),
                 "--markdown", str(tmp_path / "select.md")]) == 0
    result = json.loads(out.read_text())
    rows = {r["images"]: r for r in result["rows"]}
    assert set(rows) == {2000, 3000}
    assert rows[2000]["same_picks_as_plain"] and rows[2000]["speedup_over_plain"] > 0
    assert rows[3000]["picks"] == 150 and rows[3000]["peak_rss_mb"] > 0
    assert rows[3000]["l1_gap_after"] < rows[3000]["l1_gap_input"]
    assert "| 3000 | 0 | 150 |" in (tmp_path / "select.md").read_text()  # no earlier picks


def test_max_sum_stops_weights_and_both_loops_agree():
    n = 3000
    vectors, _ = synthetic(Synthetic(n, dim=32, seed=11))
    rng = np.random.default_rng(12)
    values = rng.random(n)
    objectives = [Objective(Strategy("DIVERSITY"), "diversity", vectors),
                  Objective(Strategy("WEIGHTS", max_sum=20.0), "weights", values)]
    everyone = np.ones(n, dtype=bool)
    fast = greedy(objectives, everyone, 500)
    assert _indices(fast) == _indices(plain_greedy(objectives, everyone, 500))
    total = values[_indices(fast)].sum()
    assert total >= 20.0 and total - values[fast[-1].index] < 20.0  # stops on reaching it


def test_float16_vectors_stay_float16_and_pick_as_the_plain_loop():
    vectors, counts = synthetic(Synthetic(6000, dim=96, seed=4, dtype="float16"))
    objectives = objectives_for(normalise(vectors), counts)
    assert objectives[0].data.dtype == np.float16
    everyone = np.ones(6000, dtype=bool)
    assert _indices(greedy(objectives, everyone, 300)) == _indices(
        plain_greedy(objectives, everyone, 300))


def test_the_loop_holds_float16_vectors_once():
    import tracemalloc

    vectors, counts = synthetic(Synthetic(100_000, dim=512, seed=1, dtype="float16"))
    objectives = objectives_for(vectors, counts)
    tracemalloc.start()  # numpy's allocations, the lists' buffer among them
    greedy(objectives, np.ones(len(vectors), dtype=bool), 50)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    # the lists hold the rows once more (the caller's array is outside the count); the
    # sketches, one float32 block and the per-row state are a few hundred bytes a row: a
    # float32 copy (2x) or a float32 block of 65536 rows (1.3x) would not fit
    assert peak < vectors.nbytes + 400 * len(vectors), (peak, vectors.nbytes)
