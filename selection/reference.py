"""The selection's reference loop: :func:`pretag.selection.greedy.greedy`'s rules computed
the plain way (every value recomputed over every sample after each pick). The tests and
``pretag bench select`` compare the fast loop's picks with it."""

from __future__ import annotations

import numpy as np

from pretag.selection.cover import nearest_distances
from pretag.selection.greedy import (
    TINY,
    MaxSums,
    Objective,
    Pick,
    balance_gain,
    balance_values,
    weight_values,
)
from pretag.selection.lists import centroid, plain_lists
from pretag.selection.rows import subset, take


def plain_greedy(objectives: list[Objective], candidates: np.ndarray, count: int,
                 prior: np.ndarray | None = None) -> list[Pick]:
    """The rules of :func:`pretag.selection.greedy.greedy`, computed the plain way
    (``prior``: earlier picks, each a centre and counted, from the start)."""
    prior = np.zeros(0, np.intp) if prior is None else np.asarray(prior, np.intp)
    available = candidates.copy()
    rows = np.flatnonzero(candidates)
    d = np.zeros(len(candidates))
    diversity = [o for o in objectives if o.kind == "diversity"]
    x = diversity[0].data if diversity else None
    lists = plain_lists(x) if x is not None else None  # the fast loop's distances
    first = not len(prior)
    if x is not None and lists is not None and first:
        d[rows] = lists.all_to(centroid(subset(x, rows)))[rows]
    elif x is not None:  # the same once-only computation as the fast loop's
        d[rows] = nearest_distances(take(x, prior), subset(x, rows))
    states = [o.data[prior].sum(axis=0).astype(float) for o in objectives
              if o.kind == "balance"]
    limit = next((o.strategy.minimum_distance for o in diversity
                  if o.strategy.minimum_distance is not None), None)
    sums = MaxSums(objectives)
    picks: list[Pick] = []
    while len(picks) < min(count, len(rows)):
        if limit is not None and d[available].max() < limit:
            break
        values = _plain_values(objectives, d, available, states)
        score = sum((o.strategy.strength * np.log(np.maximum(v, TINY))
                     for o, v in zip(objectives, values, strict=True)),
                    start=np.zeros(len(available)))
        index = int(np.argmax(np.where(available, score, -np.inf)))
        picks.append(Pick(index, tuple(float(v[index]) for v in values)))
        if sums.reached(index):
            break
        available[index] = False
        balance = iter(states)
        for o in objectives:
            if o.kind == "balance":
                next(balance)[:] += o.data[index]
        if lists is not None:
            new = lists.all_to(lists.row(index))
            new[index] = 0.0
            d = new if first else np.minimum(d, new)
            d[~candidates] = 0.0
            first = False
    return picks


def _plain_values(objectives: list[Objective], d: np.ndarray, available: np.ndarray,
                  states: list[np.ndarray]) -> list[np.ndarray]:
    values = []
    balance = iter(states)
    for o in objectives:
        if o.kind == "diversity":
            values.append(np.maximum(d, TINY) / max(float(d[available].max()), TINY))
        elif o.kind == "balance":
            assert o.target is not None
            empty = o.data.sum(axis=1) == 0
            values.append(balance_values(balance_gain(next(balance), o.data, o.target),
                                         empty, available))
        else:
            values.append(weight_values(o.data))
    return values
