"""``pretag select --ray [ADDRESS]``: the greedy loop with the vectors sharded over Ray
actors, for runs whose vectors do not fit one machine.

Each actor reads its own Parquet shards of the run's image vectors (the driver reads only
their ``filename`` columns) and keeps, per sample it holds, the distance to the nearest
pick. Per pick there are two rounds: every actor updates its distances with the last pick
and reports what the objectives are scaled by (its largest distance; each BALANCE
input's largest gain magnitude and smallest gain); the driver reduces them, and every
actor offers its best candidate under the global scales; the driver takes the best
(ties: the lowest sample index) and sends it, vector included, with the next round.

The values are those of :func:`pretag.selection.reference.plain_greedy`, computed the same
way on each actor's rows (float16 rows in faiss lists, the same distance kernel as one
machine's; the same expressions in the same order), so the picks equal one machine's
(the tests check it against :func:`greedy`).
BALANCE, WEIGHTS and THRESHOLD inputs are computed on the driver, which holds everything
but the vectors. Not distributed (exit 2 with ``--ray``): TYPICALITY, SIMILARITY, custom
embeddings, object level, video windows and the datapool.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pretag.selection.config import SelectionConfigError
from pretag.selection.greedy import (
    TINY,
    MaxSums,
    Objective,
    Pick,
    balance_gain,
    balance_scale,
    group_rows,
    scaled_balance,
    weight_values,
)
from pretag.selection.lists import mean_of, plain_lists, row_sum
from pretag.selection.rows import ShardRows, subset

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Part:
    """One shard as an actor reads it: its path, which of its rows are samples and each
    such row's sample index."""

    path: str
    positions: tuple[int, ...]
    samples: tuple[int, ...]


class ShardWorker:
    """One actor's rows: unit vectors, candidates, the objectives' per-row data (as the
    driver made them) and the distance of each row to its nearest pick."""

    def __init__(self, parts: Sequence[Part], candidates: np.ndarray,
                 objectives: list[tuple[str, float, Any, Any]]) -> None:
        from pretag.job.vectors import vector_names

        bounds, dim = [0], None
        for part in parts:
            names, dim = vector_names(Path(part.path), dim)
            bounds.append(bounds[-1] + len(names))
        stored = np.array([bounds[k] + p for k, part in enumerate(parts)
                           for p in part.positions], np.int64)
        rows = np.array([s for part in parts for s in part.samples], np.intp)
        order = np.argsort(rows, kind="stable")
        self.rows = rows[order]  # ascending: ties go low
        # read from the shards pass by pass, held once: in the lists
        x = ShardRows([Path(part.path) for part in parts], np.array(bounds), dim or 0,
                      stored[order])
        self.lists = plain_lists(x)  # the distances one machine computes (its only copy)
        self.candidates = candidates[self.rows]
        self.sum = row_sum(subset(x, np.flatnonzero(self.candidates)))  # the first centre
        self.available = self.candidates.copy()
        self.d: np.ndarray = np.zeros(len(self.rows))
        self.first = True
        # (kind, strength, per-row data, target): diversity's data is None (the vectors)
        self.objectives: list[tuple[str, float, Any, Any]] = [
            (kind, strength, None if data is None else data[self.rows], target)
            for kind, strength, data, target in objectives]
        # BALANCE depends on a row only through its class counts: per distinct row (group)
        self.groups: list[Any] = [self._grouped(data) if kind == "balance" else None
                                  for kind, _, data, _ in self.objectives]

    def _grouped(self, data: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray,
                                                  np.ndarray]:
        """(distinct rows, each row's group, groups without objects, available rows per
        group)."""
        unique, gid = group_rows(data)
        live = np.bincount(gid[self.available], minlength=len(unique))
        return unique, gid, unique.sum(axis=1) == 0, live

    def centre_sum(self) -> tuple[np.ndarray, int]:
        """The candidates' vector sum (float64) and count, for the first centre."""
        return self.sum, int(self.candidates.sum())

    def ping(self) -> int:
        """Nothing but a round trip (how many rows this actor holds)."""
        return len(self.rows)

    def start(self, centre: np.ndarray) -> None:
        self.d = np.where(self.candidates, self.lists.all_to(centre), 0.0)

    def step(self, pick: tuple[int, np.ndarray] | None, states: list[np.ndarray]
             ) -> tuple[float, list[tuple[float, float, bool]]]:
        """The last pick counted (None before the first), then this actor's scales: its
        largest distance among the available rows and, per BALANCE input,
        :func:`~pretag.selection.greedy.balance_scale` of its available rows."""
        if pick is not None:
            self._picked(*pick)
        live = self.available
        maxd = float(self.d[live].max(initial=0.0))
        scales = []
        self.gains = []
        balance = iter(states)
        for (kind, _, _, target), grouped in zip(self.objectives, self.groups, strict=True):
            if kind != "balance":
                continue
            unique, _, empty, group_live = grouped
            gain = balance_gain(next(balance), unique, target)
            self.gains.append(gain)
            scales.append(balance_scale(gain, empty, group_live > 0))
        return maxd, scales

    def _picked(self, sample: int, vector: np.ndarray) -> None:
        new = self.lists.all_to(vector)
        at = np.searchsorted(self.rows, sample)
        if at < len(self.rows) and self.rows[at] == sample:
            new[at] = 0.0
            self.available[at] = False
            for grouped in self.groups:
                if grouped is not None:
                    grouped[3][grouped[1][at]] -= 1
        self.d = new if self.first else np.minimum(self.d, new)
        self.d[~self.candidates] = 0.0
        self.first = False

    def best(self, maxd: float, scales: list[tuple[float, float, bool]]
             ) -> tuple[float, int, tuple[float, ...], np.ndarray] | None:
        """This actor's best available row under the global scales: (score, sample,
        each objective's value, its vector), or None when it has none left."""
        if not self.available.any():
            return None
        values = []
        gains = iter(zip(self.gains, scales, strict=True))
        for (kind, _, data, _), grouped in zip(self.objectives, self.groups, strict=True):
            if kind == "diversity":
                values.append(np.maximum(self.d, TINY) / max(maxd, TINY))
            elif kind == "balance":  # balance_values, per group, then per row
                gain, scale = next(gains)
                values.append(scaled_balance(gain, grouped[2], *scale)[grouped[1]])
            else:
                values.append(data)
        score = sum((strength * np.log(np.maximum(v, TINY))
                     for (_, strength, _, _), v in zip(self.objectives, values, strict=True)),
                    start=np.zeros(len(self.rows)))
        at = int(np.argmax(np.where(self.available, score, -np.inf)))
        return (float(score[at]), int(self.rows[at]), tuple(float(v[at]) for v in values),
                self.lists.row(at))


@dataclass
class Counters:
    """Where a distributed selection's time went (per-pick overhead in RESULTS.md)."""

    setup_s: float = 0.0
    picks: int = 0
    loop_s: float = 0.0


def distributed_greedy(actors: list[Any], objectives: list[Objective], candidates: np.ndarray,
                       count: int, counters: Counters | None = None) -> list[Pick]:
    """:func:`~pretag.selection.greedy.greedy`'s picks from actors made by
    :func:`start_actors` (their data already given)."""
    import ray

    counters = counters or Counters()
    count = min(count, int(candidates.sum()))
    if count <= 0:
        return []
    sums_ = [ray.get(a.centre_sum.remote()) for a in actors]
    total = np.sum([s for s, _ in sums_], axis=0)
    centre = mean_of(total, sum(n for _, n in sums_))
    ray.get([a.start.remote(centre) for a in actors])
    limit = next((o.strategy.minimum_distance for o in objectives if o.kind == "diversity"
                  and o.strategy.minimum_distance is not None), None)
    balances = [o for o in objectives if o.kind == "balance"]
    states = [np.zeros(o.data.shape[1]) for o in balances]
    sums = MaxSums(objectives)
    picks: list[Pick] = []
    last: tuple[int, np.ndarray] | None = None
    started = time.perf_counter()
    while len(picks) < count:
        reports = ray.get([a.step.remote(last, states) for a in actors])
        maxd = max(r[0] for r in reports)
        if limit is not None and maxd < limit:
            log.info("stopping after %d picks: no candidate is far enough from the picked "
                     "ones (stopping_condition_minimum_distance)", len(picks))
            break
        scales = [(max(r[1][k][0] for r in reports), min(r[1][k][1] for r in reports),
                   any(r[1][k][2] for r in reports)) for k in range(len(balances))]
        offers = [o for o in ray.get([a.best.remote(maxd, scales) for a in actors]) if o]
        _, sample, values, vector = max(offers, key=lambda o: (o[0], -o[1]))
        picks.append(Pick(sample, values))
        if sums.reached(sample):
            break
        for state, o in zip(states, balances, strict=True):
            state += o.data[sample]
        last = (sample, vector)
    counters.picks, counters.loop_s = len(picks), time.perf_counter() - started
    return picks


def start_actors(parts: list[list[Part]], candidates: np.ndarray,
                 objectives: list[Objective], cpus_per_actor: float = 1.0) -> list[Any]:
    """One actor per list of parts, each given the per-sample data of the objectives that
    are not the vectors (WEIGHTS as their values: scaled over all samples here)."""
    import ray

    plain: list[tuple[str, float, Any, Any]] = []
    for o in objectives:
        data = None if o.kind == "diversity" else (
            weight_values(o.data) if o.kind == "weights" else o.data)
        plain.append((o.kind, o.strategy.strength, data, o.target))
    worker: Any = ray.remote(num_cpus=cpus_per_actor)(ShardWorker)
    shared_objectives, shared_candidates = ray.put(plain), ray.put(candidates)
    actors = [worker.remote(p, shared_candidates, shared_objectives) for p in parts if p]
    ray.get([a.centre_sum.remote() for a in actors])  # loaded, or the error now
    return actors


def assign(shards: list[tuple[str, list[str]]], where: dict[str, int], actors: int
           ) -> list[list[Part]]:
    """The run's shards (path, filenames) as contiguous groups of about equal rows, one
    per actor; rows that are not samples (left out as corrupt, say) are skipped."""
    parts = []
    for path, names in shards:
        kept = [(i, where[n]) for i, n in enumerate(names) if n in where]
        if kept:
            parts.append(Part(path, tuple(i for i, _ in kept), tuple(s for _, s in kept)))
    total = sum(len(p.samples) for p in parts)
    if total < len(where):
        raise SelectionConfigError(f"{len(where) - total} images have no stored vector; run "
                                   f"pretag run again")
    groups: list[list[Part]] = [[] for _ in range(max(1, min(actors, len(parts))))]
    share, done = total / len(groups), 0
    for part in parts:
        groups[min(len(groups) - 1, int(done / share))].append(part)
        done += len(part.samples)
    return groups


#: The greedy loop as :func:`pretag.selection.run.select` calls it: objectives, the
#: candidate mask and how many to pick, to the picks.
Loop = Callable[[list[Objective], np.ndarray, int], list[Pick]]


@dataclass(frozen=True)
class RayTarget:
    """Where ``pretag select --ray`` runs: the cluster (None: a local one) and the actors."""

    address: str | None = None
    actors: int = 2
    cpus_per_actor: float = 1.0


@contextmanager
def on_ray(run_dir: Path, names: list[str], target: RayTarget) -> Iterator[Loop]:
    """A connection to the cluster and the loop that runs on it for the samples ``names``
    (in sample order) of the run's image vectors."""
    import pyarrow.parquet as pq

    from pretag.job.cluster import Needs, connected
    from pretag.job.vectors import vector_shards

    if target.actors < 1 or target.cpus_per_actor <= 0:
        raise SelectionConfigError("--ray-actors must be at least 1 and "
                                   "--ray-cpus-per-actor above 0")
    needs = Needs(target.actors * target.cpus_per_actor, 0.0, f"{target.actors} actors")
    with connected(target.address, (), needs) as where:
        paths, _ = vector_shards(run_dir)
        if not paths:
            raise SelectionConfigError("EMBEDDINGS needs stored vectors: pretag run "
                                       "--embeddings image (the default)")
        shards = [(str(p), pq.read_table(str(p), columns=["filename"])["filename"]
                   .to_pylist()) for p in paths]
        parts = assign(shards, {n: i for i, n in enumerate(names)}, target.actors)

        def loop(objectives: list[Objective], candidates: np.ndarray, count: int
                 ) -> list[Pick]:
            started = time.perf_counter()
            actors = start_actors(parts, candidates, objectives, target.cpus_per_actor)
            counters = Counters(setup_s=time.perf_counter() - started)
            picks = distributed_greedy(actors, objectives, candidates, count, counters)
            log.info("%s: %d picks over %d actors in %.1f s (%.1f ms a pick; actors "
                     "loaded their shards in %.1f s)", where, counters.picks, len(actors),
                     counters.loop_s, 1000 * counters.loop_s / max(counters.picks, 1),
                     counters.setup_s)
            return picks

        yield loop
