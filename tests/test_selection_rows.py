"""The selection's vectors held once: faiss lists read in place from pretag's buffer, and a
run's shards read when asked for (ShardRows) instead of loaded."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from pretag.bench.select import Synthetic, objectives_for, synthetic
from pretag.job.vectors import VectorError, embeddings_dir, vector_shards, write_table
from pretag.selection.greedy import greedy
from pretag.selection.lists import Lists, layout
from pretag.selection.reference import plain_greedy
from pretag.selection.rows import ShardRows, float16, float32, normalise, sample


def _shards(folder: Path, vectors: np.ndarray, names: list[str], per: int = 1000) -> Path:
    """``vectors`` as a run's image shards, ``per`` rows each, in the order given."""
    root = embeddings_dir(folder)
    root.mkdir(parents=True, exist_ok=True)
    dim = vectors.shape[1]
    for number, s in enumerate(range(0, len(vectors), per), start=1):
        block = np.asarray(vectors[s:s + per], np.float16)
        column = pa.FixedSizeListArray.from_arrays(pa.array(block.reshape(-1)), dim)
        write_table(pa.table({"filename": names[s:s + per], "vector": column}),
                    root / f"images-{number:06d}.parquet")
    return folder


def _rows(folder: Path, names: list[str]) -> ShardRows:
    return ShardRows.of_run(vector_shards(folder)[0], names)


def test_the_buffer_is_the_index_faiss_itself_writes():
    import faiss

    rng = np.random.default_rng(0)
    x = rng.standard_normal((700, 24)).astype(np.float16)
    order = rng.permutation(700)
    starts = np.array([0, 5, 6, 300, 650])
    ours = Lists(x, order, starts)
    theirs = faiss.IndexIVFScalarQuantizer(faiss.IndexFlatL2(24), 24, len(starts),
                                           faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_L2,
                                           False)
    theirs.is_trained = True
    ends = np.append(starts[1:], 700)
    for i, (s, e) in enumerate(zip(starts.tolist(), ends.tolist(), strict=True)):
        ids = np.arange(s, e, dtype=np.int64)
        codes = np.ascontiguousarray(x[order[s:e]]).view(np.uint8)  # held while faiss copies
        theirs.invlists.add_entries(i, e - s, faiss.swig_ptr(ids), faiss.swig_ptr(codes))
    theirs.ntotal = 700
    written = np.asarray(faiss.serialize_index(theirs))
    _, lead, codes_at = layout(24, ends - starts)
    assert np.array_equal(ours.buffer[lead:], written)  # byte for byte
    assert codes_at[0] % 64 == 0
    # and the scan reads our buffer: change a stored row, its distance changes
    c = np.zeros(24, np.float32)
    before = ours.all_to(c)[3]
    ours.buffer[2 * ours.at[3]:2 * ours.at[3] + 48] = np.full(24, 2, np.float16).view(np.uint8)
    assert ours.all_to(c)[3] == pytest.approx(np.sqrt(24 * 4.0)) != before
    assert np.array_equal(ours.take(np.array([3]))[0], np.full(24, 2, np.float16))


def test_faiss_codec_converts_as_numpy_does():
    every = np.arange(65536, dtype=np.uint16).view(np.float16).reshape(-1, 64)
    assert np.array_equal(float32(every), every.astype(np.float32), equal_nan=True)
    x = np.random.default_rng(1).standard_normal((300, 48)).astype(np.float32)
    rounded = float16(x)
    assert rounded.dtype == np.float16
    # within half a float16 step of every value (ties may round the other way)
    step = np.spacing(np.abs(x).astype(np.float16)).astype(np.float32)
    assert np.all(np.abs(rounded.astype(np.float32) - x) <= step / 2 + 1e-12)


def test_shard_rows_read_what_the_run_stored_in_any_order(tmp_path: Path):
    rng = np.random.default_rng(2)
    stored = (rng.standard_normal((5300, 32)) * 3).astype(np.float16)
    names = [f"img{i:05d}.jpg" for i in range(5300)]
    folder = _shards(tmp_path, stored, names, per=700)
    order = rng.permutation(5300)  # the samples in another order than the shards
    rows = _rows(folder, [names[i] for i in order])
    want = normalise(stored.astype(np.float32))[order]
    assert rows.shape == (5300, 32) and len(rows) == 5300
    seen = np.zeros(5300, int)
    for numbers, block in rows.blocks():
        assert np.array_equal(block, want[numbers])
        seen[numbers] += 1
    assert np.all(seen == 1)
    picked = rng.choice(5300, 50)
    assert np.array_equal(rows.take(picked), want[picked])
    assert np.array_equal(rows[7], want[7]) and np.array_equal(rows[10:20], want[10:20])
    assert np.array_equal(np.asarray(rows), want.astype(np.float16))
    part = rows.subset(np.arange(100, 5300, 3))
    assert np.array_equal(np.concatenate([b for _, b in sorted(
        part.blocks(), key=lambda nb: nb[0][0])]).shape, (len(part), 32))
    drawn = sample(rows, np.random.default_rng(0), 4096)
    shards = np.unique((rows.stored[drawn]) // 700)
    assert len(drawn) == 4096 and len(shards) <= 16 and np.all(np.diff(drawn) > 0)


def test_shard_rows_refuse_what_they_cannot_use(tmp_path: Path):
    names = [f"a{i}.jpg" for i in range(20)]
    good = _shards(tmp_path / "good", np.ones((20, 8), np.float16), names, per=10)
    with pytest.raises(VectorError, match=r"1 images have no stored vector \(e.g. b.jpg\)"):
        _rows(good, [*names, "b.jpg"])
    bad = np.ones((20, 8), np.float16)
    bad[13, 2] = np.nan
    broken = _rows(_shards(tmp_path / "nan", bad, names, per=10), names)
    with pytest.raises(VectorError, match=r"images-000002.parquet: 1 vectors hold values that"):
        list(broken.blocks())
    mixed = _shards(tmp_path / "mixed", np.ones((10, 8), np.float16), names[:10])
    root = embeddings_dir(mixed)
    column = pa.FixedSizeListArray.from_arrays(pa.array(np.ones(40, np.float16)), 4)
    write_table(pa.table({"filename": names[10:20], "vector": column}),
                root / "images-000002.parquet")
    with pytest.raises(VectorError, match=r"images-000002\.parquet holds vectors of 4 values, "
                                          r"the shards before it 8"):
        _rows(mixed, names)


def test_selection_from_shards_picks_as_from_the_array_and_as_the_plain_loop(tmp_path: Path):
    vectors, counts = synthetic(Synthetic(9000, dim=64, seed=5, dtype="float16"))
    names = [f"f{i:05d}.jpg" for i in range(9000)]
    rows = _rows(_shards(tmp_path, vectors, names, per=1024), names)
    everyone = np.ones(9000, dtype=bool)
    streamed = greedy(objectives_for(rows, counts), everyone, 300)
    held = greedy(objectives_for(normalise(vectors.astype(np.float32)), counts), everyone,
                  300)
    plain = plain_greedy(objectives_for(rows, counts), everyone, 300)
    assert [p.index for p in streamed] == [p.index for p in held] == [p.index for p in plain]


def test_selection_from_shards_holds_the_vectors_once(tmp_path: Path):
    n, dim = 60_000, 768
    vectors, counts = synthetic(Synthetic(n, dim=dim, seed=6, dtype="float16"))
    names = [f"f{i:06d}.jpg" for i in range(n)]
    folder = _shards(tmp_path, vectors, names, per=1024)
    del vectors
    rows = _rows(folder, names)
    tracemalloc.start()  # numpy's allocations, the lists' buffer among them
    greedy(objectives_for(rows, counts), np.ones(n, dtype=bool), 100)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    held = n * dim * 2  # the float16 rows, once, in the lists
    # beside them: per-row state (sketches, distances, order: a few hundred bytes a row)
    # and two float32 blocks of 8192 rows (one in use, the next being read); a float32 copy
    # (+2x) or the float32 array loaded and indexed again (as before, +4x) would not fit
    assert peak < held + 400 * n + 4 * 8192 * dim * 4, (peak, held)
