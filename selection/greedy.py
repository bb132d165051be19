"""The selection itself, on arrays: thresholds filter, then a greedy loop picks one sample
at a time maximising the product of each strategy's objective raised to its strength.

Objectives (each in [0, 1], see docs/selection.md for the rules Lightly leaves open):

* DIVERSITY: Euclidean distance of L2-normalised embeddings to the nearest sample picked so
  far, divided by the largest such distance among the candidates (k-center greedy; before
  the first pick, distance to the centroid). Recomputed after every pick. Stops when the
  largest distance is below ``stopping_condition_minimum_distance``.
* BALANCE: how much adding a sample moves the picked set's class distribution toward the
  target: the drop in L1 distance to the target, as 0.5 plus half the drop over the
  largest drop's magnitude among the candidates (no change 0.5, the best candidate 1).
  Recomputed after every pick.
* WEIGHTS: the values divided by their largest (negatives count as 0). Constant.

Ties go to the lower index, so a config picks the same samples every time.

How it scales (1M samples, 10k picks): the distances live in a :class:`Cover`, which only
recomputes the cells a new pick can reach. A balance objective depends on a sample only
through its class-count row, so it is computed once per distinct row (a *group*), not per
sample. The argmax runs over blocks of at most ``_BLOCK`` samples of one group, each
holding its best ``diversity x weights`` term; a pick refreshes only the blocks of samples
whose distance dropped. ``pretag.selection.reference.plain_greedy`` is the same rules computed
the plain way (every sample, every pick); the tests check the two pick the same samples.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from pretag.selection.config import Strategy
from pretag.selection.cover import LEAF, Cover, nearest_distances, ranges
from pretag.selection.rows import TINY, subset, take

log = logging.getLogger(__name__)

_BLOCK = 32


@dataclass
class Objective:
    """One strategy over all samples."""

    strategy: Strategy
    kind: str  # diversity | balance | weights
    data: Any  # unit embeddings [N, D] (float16/float32 or ShardRows), class counts
    # [N, C] or weights [N]
    target: np.ndarray | None = None  # balance: [C], sums to 1


@dataclass(frozen=True)
class Pick:
    index: int
    objectives: tuple[float, ...]  # each strategy's objective value when it was picked


def greedy(objectives: list[Objective], candidates: np.ndarray, count: int,
           leaf: int = LEAF, search: Search | None = None,
           prior: np.ndarray | None = None) -> list[Pick]:
    """Pick up to ``count`` of the ``candidates`` (a bool mask over all samples);
    ``search``: the loop's state made beforehand (the benchmark reads its counters);
    ``prior``: samples picked by earlier selections (not candidates), which count as picked
    from the start: DIVERSITY's first centres, BALANCE's first counts."""
    rows = np.flatnonzero(candidates)
    count = min(count, len(rows))
    if count <= 0:
        return []
    search = search or Search(objectives, rows, leaf, prior)
    sums = MaxSums(objectives)
    picks: list[Pick] = []
    while len(picks) < count:
        if search.too_close():
            log.info("stopping after %d picks: no candidate is far enough from the picked "
                     "ones (stopping_condition_minimum_distance)", len(picks))
            break
        picks.append(search.pick())
        if sums.reached(picks[-1].index):
            log.info("stopping after %d picks: the picked samples' values reached "
                     "stopping_condition_max_sum", len(picks))
            break
    return picks


class MaxSums:
    """WEIGHTS' ``stopping_condition_max_sum``: the picks stop once the sum of a WEIGHTS
    input's values over them reaches it (the pick that reaches it is kept)."""

    def __init__(self, objectives: list[Objective]) -> None:
        self.limits = [(o.data, o.strategy.max_sum) for o in objectives
                       if o.kind == "weights" and o.strategy.max_sum is not None]
        self.sums = [0.0] * len(self.limits)

    def reached(self, index: int) -> bool:
        done = False
        for i, (data, limit) in enumerate(self.limits):
            self.sums[i] += float(data[index])
            done = done or self.sums[i] >= float(limit or 0.0)
        return done


def group_rows(table: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(the distinct rows, sorted; each row's number among them): ``np.unique(axis=0)``
    through a column-wise sort, which is 4x faster at 1M rows."""
    if not table.shape[1]:
        return np.zeros((1, 0)), np.zeros(len(table), dtype=np.intp)
    order = np.lexsort(table.T[::-1])
    ranked = table[order]
    new = np.append(True, np.any(ranked[1:] != ranked[:-1], axis=1))
    gid = np.empty(len(table), dtype=np.intp)
    gid[order] = np.cumsum(new) - 1
    return ranked[new], gid


def balance_values(gain: np.ndarray, empty: np.ndarray, live: np.ndarray) -> np.ndarray:
    """A balance gain per sample (or group) as an objective in [0, 1]: 0.5 plus half the
    gain divided by the largest gain magnitude among the ``live`` ones that have objects,
    so a sample that leaves the distance as it is scores 0.5, the one that moves it most
    toward the target 1 (or, moving it most away, 0); when no gain differs from 0 they all
    score 1. Samples without objects score half the worst live one that has some.

    Until 2026-12 the values were min-max scaled with samples without objects placed one
    whole L1 unit below the worst gain: that stretched the range about a thousandfold
    beyond the gains of one pick (~0.001) and squeezed every sample with objects toward 1,
    so beside DIVERSITY the balance barely counted (benchmarks/RESULTS.md, "BALANCE and
    DIVERSITY: the strength sweep")."""
    return scaled_balance(gain, empty, *balance_scale(gain, empty, live))


def balance_scale(gain: np.ndarray, empty: np.ndarray, live: np.ndarray
                  ) -> tuple[float, float, bool]:
    """What :func:`balance_values` scales by, over the ``live`` samples with objects: the
    largest gain magnitude, the smallest gain, and whether there are any (the distributed
    loop reduces these over its actors)."""
    filled = live & ~empty
    return (float(np.abs(gain[filled]).max(initial=0.0)),
            float(gain[filled].min(initial=np.inf)), bool(filled.any()))


def scaled_balance(gain: np.ndarray, empty: np.ndarray, scale: float, lowest: float,
                   filled: bool) -> np.ndarray:
    """:func:`balance_values` from its scales: samples without objects get half the
    value of the smallest gain (that of the worst live sample with objects)."""
    values = 0.5 + 0.5 * gain / scale if scale > 0 else np.ones(len(gain))
    if filled:
        values[empty] = 0.5 * (0.5 + 0.5 * lowest / scale if scale > 0 else 1.0)
    return values


def balance_gain(state: np.ndarray, rows: np.ndarray, target: np.ndarray,
                 row_totals: np.ndarray | None = None) -> np.ndarray:
    """Drop in L1 distance to ``target`` when each row is added to the picked ``state``
    (``row_totals``: the rows' sums, when the caller keeps them)."""
    shares = rows + state[None, :]
    totals = (rows.sum(axis=1) if row_totals is None else row_totals) + state.sum()
    np.divide(shares, totals[:, None], out=shares, where=totals[:, None] > 0)
    shares[totals == 0] = 0.0
    shares -= target
    np.abs(shares, out=shares)
    return l1_to(state, target) - shares.sum(axis=1)


def weight_values(data: np.ndarray) -> np.ndarray:
    """WEIGHTS: the values divided by their largest, negatives counted as 0."""
    w = np.clip(data.astype(np.float64), 0, None)
    return w / max(w.max(initial=0.0), TINY)


def l1_to(counts: np.ndarray, target: np.ndarray) -> float:
    total = counts.sum()
    shares = counts / total if total > 0 else np.zeros_like(counts)
    return float(np.abs(shares - target).sum())


class Search:
    """The loop's state; positions are those of the Cover's order."""

    def __init__(self, objectives: list[Objective], rows: np.ndarray, leaf: int,
                 prior: np.ndarray | None = None):
        self.objectives = objectives
        prior = np.zeros(0, np.intp) if prior is None else np.asarray(prior, np.intp)
        self.limit: float | None = None
        self.cover: Cover | None = None
        self.div_strength = 0.0
        order = np.arange(len(rows))
        for o in objectives:
            if o.kind == "diversity":
                if self.cover is None:
                    data = subset(o.data, rows)
                    self.cover = Cover(data, leaf)
                    order = self.cover.order
                    if len(prior):  # once, for all earlier picks
                        self.cover.seed(nearest_distances(take(o.data, prior), data))
                self.div_strength += o.strategy.strength
                if o.strategy.minimum_distance is not None:
                    self.limit = o.strategy.minimum_distance
        self.samples = rows[order]  # sample index of each position
        self._weights()
        self._groups(prior)
        self._blocks()

    def _weights(self) -> None:
        self.static = np.zeros(len(self.samples))
        self.weights: dict[int, np.ndarray] = {}
        for i, o in enumerate(self.objectives):
            if o.kind == "weights":
                self.weights[i] = weight_values(o.data)
                self.static += o.strategy.strength * np.log(
                    np.maximum(self.weights[i][self.samples], TINY))

    def _groups(self, prior: np.ndarray) -> None:
        balance = [(i, o) for i, o in enumerate(self.objectives) if o.kind == "balance"]
        n = len(self.samples)
        table = (np.concatenate([o.data[self.samples] for _, o in balance], axis=1)
                 if balance else np.zeros((n, 0)))
        unique, self.gid = group_rows(table)
        self.group_size = np.bincount(self.gid, minlength=len(unique))
        self.group_live = self.group_size.copy()  # members not picked yet
        self.balance = []  # (objective index, group rows, row sums, target, picked counts)
        start = 0
        for i, o in balance:
            width = o.data.shape[1]
            part = unique[:, start:start + width]
            start += width
            assert o.target is not None
            state = o.data[prior].sum(axis=0).astype(float) if len(prior) else np.zeros(width)
            self.balance.append((i, part, part.sum(axis=1), o.target, state))

    def _blocks(self) -> None:
        self.by_group = np.lexsort((self.samples, self.gid))  # group, then sample index
        sizes = self.group_size
        blocks = -(-sizes // _BLOCK)  # ceil
        group_of_block = np.repeat(np.arange(len(sizes)), blocks)
        group_start = np.concatenate([[0], np.cumsum(sizes)[:-1]])
        first_block = np.concatenate([[0], np.cumsum(blocks)[:-1]])
        within = np.arange(len(group_of_block)) - first_block[group_of_block]
        self.block_start = group_start[group_of_block] + within * _BLOCK
        self.block_size = np.minimum(_BLOCK, sizes[group_of_block] - within * _BLOCK)
        self.block_group = group_of_block
        self.block_of = np.empty(len(self.samples), dtype=np.intp)
        self.block_of[self.by_group] = np.repeat(np.arange(len(group_of_block)),
                                                 self.block_size)
        self.live = np.ones(len(self.samples), dtype=bool)
        self.key = self.static + self._diversity_term(np.arange(len(self.samples)))
        self.block_best = np.empty(len(group_of_block))
        self.block_pos = np.empty(len(group_of_block), dtype=np.intp)
        self._refresh(np.arange(len(group_of_block)))

    def _diversity_term(self, positions: np.ndarray) -> np.ndarray:
        if self.cover is None:
            return np.zeros(len(positions))
        return self.div_strength * np.log(np.maximum(self.cover.d[positions], TINY))

    def _refresh(self, blocks: np.ndarray) -> None:
        """Best key (and its position, the lowest sample index among ties) of each block."""
        starts = self.block_start[blocks]
        elements, seg = ranges(starts, starts + self.block_size[blocks])
        positions = self.by_group[elements]
        values = self.key[positions]
        best = np.maximum.reduceat(values, seg)
        hits = np.flatnonzero(values == np.repeat(best, self.block_size[blocks]))
        self.block_best[blocks] = best
        self.block_pos[blocks] = positions[hits[np.searchsorted(hits, seg)]]

    def _balance_now(self) -> list[np.ndarray]:
        live = self.group_live > 0
        return [balance_values(balance_gain(state, part, target, totals), totals == 0, live)
                for _, part, totals, target, state in self.balance]

    def too_close(self) -> bool:
        return (self.limit is not None and self.cover is not None
                and self.cover.max() < self.limit)

    def pick(self) -> Pick:
        values = self._balance_now()
        group_score = np.zeros(len(self.group_live))
        for (i, *_), v in zip(self.balance, values, strict=True):
            group_score += self.objectives[i].strategy.strength * np.log(np.maximum(v, TINY))
        score = self.block_best + group_score[self.block_group]
        ties = np.flatnonzero(score == score.max())
        block = ties[np.argmin(self.samples[self.block_pos[ties]])]
        position = int(self.block_pos[block])
        group = int(self.gid[position])
        result = Pick(int(self.samples[position]), self._objective_values(position, values))
        self.live[position] = False
        self.group_live[group] -= 1
        for _, part, _, _, state in self.balance:
            state += part[group]
        # the positions whose distance dropped, and the pick's
        changed = self.cover.add(position) if self.cover is not None else np.array([position])
        self.key[changed] = self.static[changed] + self._diversity_term(changed)
        self.key[changed[~self.live[changed]]] = -np.inf
        self._refresh(np.unique(self.block_of[changed]))
        return result

    def _objective_values(self, position: int, balance: list[np.ndarray]) -> tuple[float, ...]:
        out = []
        at = {i: v[self.gid[position]] for (i, *_), v in zip(self.balance, balance,
                                                              strict=True)}
        for i, o in enumerate(self.objectives):
            if o.kind == "diversity":
                assert self.cover is not None
                out.append(float(self.cover.d[position]) / max(self.cover.max(), TINY))
            elif o.kind == "balance":
                out.append(float(at[i]))
            else:
                out.append(float(self.weights[i][self.samples[position]]))
        return tuple(out)


def passes(values: np.ndarray, strategy: Strategy) -> np.ndarray:
    """THRESHOLD: which samples the filter keeps."""
    assert strategy.threshold is not None
    t = strategy.threshold
    return {"SMALLER": values < t, "SMALLER_EQUAL": values <= t, "BIGGER": values > t,
            "BIGGER_EQUAL": values >= t}[str(strategy.operation)]
