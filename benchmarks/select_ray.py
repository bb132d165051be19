"""``pretag select --ray``'s loop (pretag.selection.distributed) on a local Ray cluster:
N synthetic float16 vectors of D values (the bench select generator) in Parquet shards of
25,000, DIVERSITY + BALANCE toward the seed target, P picks, over A actors; and the cost of
one empty round trip to every actor (the per-pick overhead floor: a pick takes two).

    python benchmarks/select_ray.py N D P A [A ...]
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray

from pretag.bench.select import TARGET, Synthetic, synthetic
from pretag.selection.config import Strategy
from pretag.selection.distributed import Counters, assign, distributed_greedy, start_actors
from pretag.selection.greedy import Objective, greedy
from pretag.selection.rows import normalise

SHARD = 25_000


def shards(vectors: np.ndarray, root: Path) -> tuple[list[str], list[tuple[str, list[str]]]]:
    names = [f"frame_{i:08d}.jpg" for i in range(len(vectors))]
    out = []
    for k, start in enumerate(range(0, len(vectors), SHARD)):
        column = pa.FixedSizeListArray.from_arrays(
            pa.array(vectors[start:start + SHARD].reshape(-1)), vectors.shape[1])
        path = root / f"images-{k:06d}.parquet"
        pq.write_table(pa.table({"filename": names[start:start + SHARD], "vector": column}),
                       path)
        out.append((str(path), names[start:start + SHARD]))
    return names, out


def round_trip_ms(actors: list, times: int = 300) -> float:
    start = time.perf_counter()
    for _ in range(times):
        ray.get([a.ping.remote() for a in actors])
    return 1000 * (time.perf_counter() - start) / times


def main(n: int, dim: int, picks: int, actor_counts: list[int]) -> list[dict]:
    vectors, counts = synthetic(Synthetic(n, dim, dtype="float16"))  # as a run stores them
    objectives = [Objective(Strategy("DIVERSITY"), "diversity", normalise(vectors.copy())),
                  Objective(Strategy("BALANCE"), "balance", counts, TARGET)]
    everyone = np.ones(n, dtype=bool)
    start = time.perf_counter()
    here = [p.index for p in greedy(objectives, everyone, picks)]
    local_s = time.perf_counter() - start
    rows = []
    ray.init(address="local", include_dashboard=False, num_cpus=max(actor_counts))
    with tempfile.TemporaryDirectory() as tmp:
        names, parts_in = shards(vectors, Path(tmp))
        where = {m: i for i, m in enumerate(names)}
        for count in actor_counts:
            start = time.perf_counter()
            actors = start_actors(assign(parts_in, where, count), everyone, objectives)
            setup = time.perf_counter() - start
            empty = round_trip_ms(actors)
            counters = Counters()
            there = distributed_greedy(actors, objectives, everyone, picks, counters)
            rows.append({"samples": n, "dim": dim, "picks": picks, "actors": count,
                         "same_picks": [p.index for p in there] == here,
                         "setup_s": round(setup, 2),
                         "ms_per_pick": round(1000 * counters.loop_s / picks, 2),
                         "empty_round_trip_ms": round(empty, 2),
                         "one_machine_fast_loop_ms_per_pick": round(1000 * local_s / picks, 2)})
            for actor in actors:
                ray.kill(actor)
    ray.shutdown()
    return rows


if __name__ == "__main__":
    n, dim, picks, *actor_counts = (int(a) for a in sys.argv[1:])
    for row in main(n, dim, picks, actor_counts or [1, 2]):
        print(json.dumps(row))
