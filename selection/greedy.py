"""The selection itself, on arrays: thresholds filter, then a greedy loop picks one sample
at a time maximising the product of each strategy's objective raised to its strength.

Objectives (each in [0, 1], see docs/selection.md for the rules Lightly leaves open):

* DIVERSITY: Euclidean distance of L2-normalised embeddings to the nearest sample picked so
  far, divided by the largest such distance among the candidates (k-center greedy; before
  the first pick, distance to the centroid). Recomputed after every pick. Stops when the
  largest distance is below ``stopping_condition_minimum_distance``.
* BALANCE: how much adding a sample moves the picked set's class distribution toward the
  target: the drop in L1 distance to the target, scaled to [0, 1] over the candidates (the
  worst candidate 0, the best 1). Recomputed after every pick.
* WEIGHTS: the values divided by their largest (negatives count as 0). Constant.

Ties go to the lower index, so a config picks the same samples every time.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

from pretag.selection.config import Strategy

log = logging.getLogger(__name__)

_TINY = 1e-12


@dataclass
class Objective:
    """One strategy over the candidates; ``values`` in [0, 1], updated after each pick."""

    strategy: Strategy
    kind: str  # diversity | balance | weights
    data: np.ndarray  # embeddings [N, D], class counts [N, C] or weights [N]
    target: np.ndarray | None = None  # balance: [C], sums to 1
    values: np.ndarray = field(default_factory=lambda: np.zeros(0))
    state: np.ndarray = field(default_factory=lambda: np.zeros(0))
    _first: bool = True

    def start(self) -> None:
        self._first = True
        if self.kind == "diversity":  # chooses the first pick only; not a centre after it
            self.state = np.linalg.norm(self.data - self.data.mean(axis=0), axis=1)
        elif self.kind == "balance":
            self.state = np.zeros(self.data.shape[1])
        else:
            weights = np.clip(self.data.astype(np.float64), 0, None)
            self.values = weights / max(weights.max(initial=0.0), _TINY)
            return
        self._refresh()

    def picked(self, index: int) -> None:
        if self.kind == "diversity":
            distance = np.linalg.norm(self.data - self.data[index], axis=1)
            if self._first:
                self.state = distance
            else:
                np.minimum(self.state, distance, out=self.state)
            self._first = False
        elif self.kind == "balance":
            self.state = self.state + self.data[index]
        else:
            return
        self._refresh()

    def _refresh(self) -> None:
        if self.kind == "diversity":
            self.values = self.state / max(float(self.state.max(initial=0.0)), _TINY)
            return
        assert self.target is not None
        before = _l1_to(self.state, self.target)
        after = self.state[None, :] + self.data
        totals = after.sum(axis=1, keepdims=True)
        shares = np.divide(after, totals, out=np.zeros_like(after), where=totals > 0)
        gain = before - np.abs(shares - self.target).sum(axis=1)
        empty = self.data.sum(axis=1) == 0
        if (~empty).any():  # without objects: below the worst candidate that has some
            gain[empty] = float(gain[~empty].min()) - 1.0
        low, high = float(gain.min(initial=0.0)), float(gain.max(initial=0.0))
        self.values = (gain - low) / (high - low) if high > low else np.ones_like(gain)

    def stop(self, available: np.ndarray) -> bool:
        limit = self.strategy.minimum_distance
        if self.kind != "diversity" or limit is None or not available.any():
            return False
        return float(self.state[available].max()) < limit


def _l1_to(counts: np.ndarray, target: np.ndarray) -> float:
    total = counts.sum()
    shares = counts / total if total > 0 else np.zeros_like(counts)
    return float(np.abs(shares - target).sum())


@dataclass(frozen=True)
class Pick:
    index: int
    objectives: tuple[float, ...]  # each strategy's objective value when it was picked


def greedy(objectives: list[Objective], candidates: np.ndarray, count: int) -> list[Pick]:
    """Pick up to ``count`` of the ``candidates`` (a bool mask over all samples)."""
    available = candidates.copy()
    for objective in objectives:
        objective.start()
    picks: list[Pick] = []
    strengths = np.array([o.strategy.strength for o in objectives])
    while len(picks) < count and available.any():
        if any(o.stop(available) for o in objectives):
            log.info("stopping after %d picks: no candidate is far enough from the picked "
                     "ones (stopping_condition_minimum_distance)", len(picks))
            break
        if objectives:
            values = np.stack([o.values for o in objectives])
            score = (strengths[:, None] * np.log(np.maximum(values, _TINY))).sum(axis=0)
        else:
            score = np.zeros(len(available))
        score = np.where(available, score, -np.inf)
        index = int(np.argmax(score))
        picks.append(Pick(index, tuple(float(o.values[index]) for o in objectives)))
        available[index] = False
        for objective in objectives:
            objective.picked(index)
    return picks


def normalise(vectors: np.ndarray) -> np.ndarray:
    """L2-normalised rows (as Lightly normalises embeddings by default)."""
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.maximum(norms, _TINY)


def passes(values: np.ndarray, strategy: Strategy) -> np.ndarray:
    """THRESHOLD: which samples the filter keeps."""
    assert strategy.threshold is not None
    t = strategy.threshold
    return {"SMALLER": values < t, "SMALLER_EQUAL": values <= t, "BIGGER": values > t,
            "BIGGER_EQUAL": values >= t}[str(strategy.operation)]
