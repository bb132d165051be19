"""pretag select --ray: the greedy loop with the vectors sharded over actors on a real
local Ray cluster gives one machine's picks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pretag.cli import main
from pretag.selection.config import SelectionConfigError
from pretag.selection.distributed import assign

pytestmark = pytest.mark.slow  # see the README: pytest -m "not slow"

# as tests/test_ray.py: a cluster with token authentication needs drivers to opt in
RAY_ENV = {**os.environ, **({"RAY_AUTH_MODE": "token"}
                            if (Path.home() / ".ray" / "auth_token").exists() else {})}

N, DIM, SHARD, PICKS = 200_000, 32, 25_000, 150


# Run in its own process, as a driver joining the cluster (RAY_ENV): DIVERSITY with
# BALANCE and WEIGHTS, a tenth of the samples no candidates, the shards handed out in a
# shuffled order; prints whether the actors picked what greedy picks here.
SCRIPT = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    import numpy as np, pyarrow as pa, pyarrow.parquet as pq, ray
    from pretag.bench.select import TARGET, Synthetic, synthetic
    from pretag.selection.config import Strategy
    from pretag.selection.distributed import (Counters, assign, distributed_greedy,
                                              start_actors)
    from pretag.selection.greedy import Objective, greedy
    from pretag.selection.rows import normalise
    address, root, n, dim, shard, picks = sys.argv[1:7]
    n, dim, shard, picks, root = int(n), int(dim), int(shard), int(picks), Path(root)
    vectors, counts = synthetic(Synthetic(n, dim))
    names = [f"drive_{i // 1000:03d}/frame_{i:06d}.jpg" for i in range(n)]
    shards = []
    for k, start in enumerate(range(0, n, shard)):
        column = pa.FixedSizeListArray.from_arrays(
            pa.array(vectors[start:start + shard].reshape(-1)), dim)
        path = root / f"images-{k:06d}.parquet"
        pq.write_table(pa.table({"filename": names[start:start + shard], "vector": column}),
                       path)
        shards.append((str(path), names[start:start + shard]))
    rng = np.random.default_rng(1)
    weights, candidates = rng.random(n), rng.random(n) > 0.1
    objectives = [Objective(Strategy("DIVERSITY"), "diversity", normalise(vectors.copy())),
                  Objective(Strategy("BALANCE", strength=0.5), "balance", counts, TARGET),
                  Objective(Strategy("WEIGHTS", strength=0.2), "weights", weights)]
    here = greedy(objectives, candidates, picks)
    order = rng.permutation(len(shards))
    parts = assign([shards[i] for i in order], {m: i for i, m in enumerate(names)}, 2)
    ray.init(address=address)
    actors = start_actors(parts, candidates, objectives)
    counters = Counters()
    there = distributed_greedy(actors, objectives, candidates, picks, counters)
    ray.shutdown()
    print(json.dumps({
        "same": [p.index for p in there] == [p.index for p in here],
        "values": max(float(np.abs(np.subtract(a.objectives, b.objectives)).max())
                      for a, b in zip(there, here)),
        "picks": counters.picks, "ms_per_pick": 1000 * counters.loop_s / counters.picks}))
""")


def test_sharded_picks_equal_one_machine_s_at_200k(ray_cluster: str, tmp_path: Path):
    done = subprocess.run([sys.executable, "-c", SCRIPT, ray_cluster, str(tmp_path),
                           str(N), str(DIM), str(SHARD), str(PICKS)], capture_output=True,
                          text=True, timeout=600, env=RAY_ENV)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["same"] and result["picks"] == PICKS and result["values"] < 1e-9


def test_shards_missing_a_sample_are_refused(tmp_path: Path):
    with pytest.raises(SelectionConfigError, match="1 images have no stored vector"):
        assign([("a.parquet", ["x.jpg"])], {"x.jpg": 0, "y.jpg": 1}, 2)


def _select(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pretag.cli", "select", *args],
                          capture_output=True, text=True, timeout=600, env=RAY_ENV)


def test_pretag_select_ray_writes_one_machine_s_selection(ray_cluster: str, coco128: Path,
                                                         yolox_model: Path, tmp_path: Path):
    run = tmp_path / "run"
    assert main(["run", str(coco128), "--output-dir", str(run), "--model", str(yolox_model),
                 "--shard-images", "32", "--quiet"]) == 0
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"n_samples": 40, "strategies": [
        {"input": {"type": "EMBEDDINGS"}, "strategy": {"type": "DIVERSITY"}},
        {"input": {"type": "PREDICTIONS", "task": "lightly_pretagging",
                   "name": "CLASS_DISTRIBUTION"},
         "strategy": {"type": "BALANCE", "target": {"person": 0.5, "car": 0.5}}}]}))
    local = tmp_path / "local"
    assert main(["select", str(run), "--config", str(config), "--output-dir", str(local)]) == 0
    done = _select(str(run), "--config", str(config), "--output-dir", str(tmp_path / "ray"),
                   "--ray", ray_cluster, "--ray-actors", "2")
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "ray" / "selection" / "selected.txt").read_text() == \
        (local / "selection" / "selected.txt").read_text()
    assert "ms a pick" in done.stderr
    typical = tmp_path / "typical.json"
    typical.write_text(json.dumps({"n_samples": 5, "strategies": [
        {"input": {"type": "EMBEDDINGS"}, "strategy": {"type": "TYPICALITY"}}]}))
    refused = _select(str(run), "--config", str(typical), "--output-dir", str(tmp_path / "t"),
                      "--ray", ray_cluster)
    assert refused.returncode == 2 and "TYPICALITY is not distributed yet" in refused.stderr
    assert "Traceback" not in refused.stderr
