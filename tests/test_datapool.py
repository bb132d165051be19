"""Incremental runs with Lightly's datapool (issue 22), on real images in two phases: half
of coco128, then all of it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pretag.cli import main
from pretag.job.outputs import prediction_path
from pretag.job.run import RunConfig
from pretag.job.vectors import load_embeddings
from pretag.local import run_locally
from pretag.selection import run as selection_run
from pretag.selection.config import load
from pretag.selection.rows import normalise
from pretag.selection.run import image_samples, select
from pretag.selection.samples import Samples

pytestmark = pytest.mark.slow  # see the README: pytest -m "not slow"

DIVERSE = {"input": {"type": "EMBEDDINGS"}, "strategy": {"type": "DIVERSITY"}}
TARGET = {"car": 0.4, "person": 0.4, "truck": 0.1, "bus": 0.1}
BALANCE = {"input": {"type": "PREDICTIONS", "task": "lightly_pretagging",
                     "name": "CLASS_DISTRIBUTION"},
           "strategy": {"type": "BALANCE", "target": TARGET}}


@pytest.fixture(scope="module")
def phases(tmp_path_factory: pytest.TempPathFactory, coco128: Path, yolox_model: Path
           ) -> dict[str, Path]:
    """Run folder after phase 1 (64 images) copied aside, then phase 2 (all 128)."""
    root = tmp_path_factory.mktemp("datapool")
    images = sorted((coco128 / "images").rglob("*.jpg"))
    folder = root / "in"
    folder.mkdir()
    for path in images[:64]:
        (folder / path.name).symlink_to(path)
    run = root / "run"
    first = run_locally(RunConfig(folder, run, quiet=True), yolox_model)
    assert (first.written, first.failed) == (64, 0)
    shutil.copytree(run, root / "run_phase1")
    for path in images[64:]:
        (folder / path.name).symlink_to(path)
    second = run_locally(RunConfig(folder, run, quiet=True), yolox_model)
    assert (second.skipped, second.written) == (64, 64)  # only the new half predicted
    return {"root": root, "folder": folder, "run": run, "phase1": root / "run_phase1"}


def _config(path: Path, n: int, strategies: list[dict[str, Any]], pool: bool = True) -> Path:
    path.write_text(json.dumps({"worker_config": {"use_datapool": pool},
                                "selection_config": {"n_samples": n,
                                                     "strategies": strategies}}))
    return path


def _select(run: Path, config: Path, out: Path | None = None) -> int:
    return main(["select", str(run), "--config", str(config),
                 *(["--output-dir", str(out)] if out else [])])


def _picked(base: Path) -> list[str]:
    return (base / "selection" / "selected.txt").read_text().split()


def test_the_second_selection_picks_what_the_first_lacks(
        phases: dict[str, Path], caplog: pytest.LogCaptureFixture, tmp_path: Path):
    run = tmp_path / "run"
    shutil.copytree(phases["run"], run)
    config = _config(tmp_path / "pool.json", 10, [DIVERSE])
    out = tmp_path / "sel"
    shutil.copytree(phases["phase1"], out / "phase1")
    assert _select(out / "phase1", config) == 0
    first = _picked(out / "phase1")
    record = json.loads((out / "phase1" / "datapool.json").read_text())
    assert [s["picks"] for s in record["selections"]] == [first] and len(first) == 10
    assert record["made_with"]["vector_dim"] == 448 and record["made_with"]["level"] == "images"
    shutil.copy(out / "phase1" / "datapool.json", run / "datapool.json")
    assert _select(run, config) == 0
    second = _picked(run)
    assert len(second) == 10 and not set(second) & set(first)  # never re-picked
    record = json.loads((run / "datapool.json").read_text())
    assert [s["picks"] for s in record["selections"]] == [first, second]
    report = json.loads((run / "report" / "report.json").read_text())
    assert report["datapool"]["earlier"]["samples"] == 10
    assert report["datapool"]["both"]["samples"] == 20
    assert (run / "report" / "pretagging_histogram_both.png").read_bytes()[:4] == b"\x89PNG"

    # the new picks lie farther from the earlier ones than the samples they leave
    names, vectors = load_embeddings(run)
    unit = normalise(vectors)
    where = {n: i for i, n in enumerate(names)}
    earlier = unit[[where[n] for n in first]]

    def to_earlier(rows: list[str]) -> float:
        d = np.sqrt(np.maximum(2 - 2 * unit[[where[n] for n in rows]] @ earlier.T, 0))
        return float(np.median(d.min(axis=1)))

    left = [n for n in names if n not in set(first) | set(second)]
    assert to_earlier(second) > to_earlier(left)

    # without use_datapool: refused, saying what to do
    plain = _config(tmp_path / "plain.json", 10, [DIVERSE], pool=False)
    assert _select(run, plain) == 2
    assert "datapool.json records 20 samples picked by 2 earlier selections" in caplog.text
    assert "use_datapool: true" in caplog.text
    # a record made with another vector size: refused, naming it
    edited = json.loads((run / "datapool.json").read_text())
    edited["made_with"]["vector_dim"] = 1280
    (tmp_path / "other").mkdir()
    shutil.copytree(run, tmp_path / "other" / "run")
    (tmp_path / "other" / "run" / "datapool.json").write_text(json.dumps(edited))
    assert _select(tmp_path / "other" / "run", config) == 2
    assert "vector_dim 1280 -> 448" in caplog.text


def test_a_killed_selection_keeps_the_record_and_a_rerun_picks_the_same(
        phases: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    config = _config(tmp_path / "pool.json", 8, [DIVERSE])
    for name in ("a", "b"):
        shutil.copytree(phases["phase1"], tmp_path / name)
        assert _select(tmp_path / name, config) == 0
    shutil.rmtree(tmp_path / "b" / "selection")  # b: the same record as a
    assert _select(tmp_path / "a", config) == 0  # a: a second selection, whole
    before = (tmp_path / "b" / "datapool.json").read_bytes()

    def killed(*args: Any, **kwargs: Any) -> None:
        raise KeyboardInterrupt  # as a kill would, after selection/ but before the record

    with monkeypatch.context() as patch:
        patch.setattr(selection_run, "write_report", killed)
        with pytest.raises(KeyboardInterrupt):
            selection_run.run_selection(tmp_path / "b", load(config))
    assert (tmp_path / "b" / "datapool.json").read_bytes() == before
    assert _select(tmp_path / "b", config) == 0
    assert _picked(tmp_path / "b") == _picked(tmp_path / "a")
    assert (tmp_path / "b" / "datapool.json").read_text().count('"picks"') == 2


def test_an_earlier_pick_deleted_since_is_reported(phases: dict[str, Path], tmp_path: Path,
                                                   caplog: pytest.LogCaptureFixture):
    run = tmp_path / "run"
    shutil.copytree(phases["phase1"], run)
    config = _config(tmp_path / "pool.json", 6, [DIVERSE])
    assert _select(run, config) == 0
    gone = _picked(run)[0]
    prediction_path(run, gone).unlink()
    assert _select(run, config) == 0
    assert "earlier picks are no longer in the run" in caplog.text
    report = json.loads((run / "report" / "report.json").read_text())
    assert report["datapool"]["earlier_missing"] == [gone]
    assert report["datapool"]["earlier"]["samples"] == 5


def test_with_balance_both_selections_together_come_closer_to_the_target(
        phases: dict[str, Path], tmp_path: Path):
    """Week 2 with the datapool starts from week 1's class counts; a second selection of as
    many new samples that does not (the earlier picks only left out) ends farther from the
    target. Both unions hold 20 distinct images."""
    config = _config(tmp_path / "pool.json", 10, [BALANCE])
    run = tmp_path / "run"
    shutil.copytree(phases["phase1"], run)
    assert _select(run, config) == 0
    first = _picked(run)
    record = (run / "datapool.json").read_bytes()
    shutil.rmtree(run)
    shutil.copytree(phases["run"], run)  # week 2: every image predicted
    (run / "datapool.json").write_bytes(record)
    assert _select(run, config) == 0
    pooled = _picked(run)

    samples = image_samples(run, {})
    where = {n: i for i, n in enumerate(samples.names)}
    keep = np.array(sorted(set(range(len(samples.names))) - {where[n] for n in first}))
    rest = Samples([samples.names[i] for i in keep], samples.classes, samples.counts[keep],
                   [samples.scores[i] for i in keep], samples.vectors[keep], {})
    blind = [rest.names[p.index] for p in select(load(config), rest)]

    def gap(names: list[str]) -> float:
        counts = samples.counts[[where[n] for n in names]].sum(axis=0)
        listed = [samples.classes.index(c) for c in TARGET]
        other = counts.sum() - counts[listed].sum()
        got = np.array([*counts[listed], other]) / counts.sum()
        want = np.array([*TARGET.values(), max(0.0, 1 - sum(TARGET.values()))])
        return float(np.abs(got - want).sum())

    assert len(set(first) | set(pooled)) == len(set(first) | set(blind)) == 20
    assert gap(first + pooled) < gap(first + blind)
    # Literally two selections made without the datapool (each from nothing, the second
    # over every image): the second picks week 1's images again, so their union holds
    # fewer distinct images (its gap is then not comparable: fewer, better-balanced ones;
    # at equal size, above, the datapool's union is the closer)
    plain = [samples.names[p.index] for p in select(load(config), samples)]
    assert set(first) & set(plain) and len(set(first) | set(plain)) < 20


def test_relevant_filenames_and_process_all(coco128: Path, yolox_model: Path, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str],
                                            caplog: pytest.LogCaptureFixture):
    images = sorted((coco128 / "images").rglob("*.jpg"))[:12]
    folder = tmp_path / "in"
    for i, path in enumerate(images):
        target = folder / ("a" if i < 6 else "b") / path.name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.symlink_to(path)
    relevant = tmp_path / "relevant.txt"
    relevant.write_text(f"a\n# a comment\nb/{images[6].name}\n")
    out = tmp_path / "out"
    base = ["run", str(folder), "--output-dir", str(out), "--model", str(yolox_model),
            "--quiet"]
    capsys.readouterr()
    assert main([*base, "--relevant-filenames-file", str(relevant)]) == 0
    assert "predicted now           7" in capsys.readouterr().out
    bad = tmp_path / "bad.txt"
    bad.write_text("a\n../elsewhere/x.jpg\n")
    assert main([*base, "--relevant-filenames-file", str(bad)]) == 2
    assert "bad.txt line 2: '../elsewhere/x.jpg' is not a relative path" in caplog.text

    # through --selection-config: the run restricted, then the selection; process_all
    # predicts every (relevant) input again
    config = tmp_path / "select.json"
    config.write_text(json.dumps({
        "worker_config": {"relevant_filenames_file": "relevant.txt",
                          "datasource": {"process_all": True}},
        "selection_config": {"n_samples": 3, "strategies": [DIVERSE]}}))
    assert main([*base, "--selection-config", str(config)]) == 0
    said = capsys.readouterr().out
    assert "already done (skipped)  0" in said and "predicted now           7" in said
    picked = _picked(out)
    assert len(picked) == 3 and all(p.startswith("a/") or p == f"b/{images[6].name}"
                                    for p in picked)
    config.write_text(json.dumps({
        "worker_config": {"datasource": {"process_all": "yes"}},
        "selection_config": {"n_samples": 3, "strategies": [DIVERSE]}}))
    assert main([*base, "--selection-config", str(config)]) == 2
    assert "worker_config.datasource.process_all: must be true or false" in caplog.text


def test_enable_datapool_update_false_uses_the_record_without_adding_to_it(
        phases: dict[str, Path], tmp_path: Path):
    run = tmp_path / "run"
    shutil.copytree(phases["phase1"], run)
    assert _select(run, _config(tmp_path / "pool.json", 5, [DIVERSE])) == 0
    first, record = _picked(run), (run / "datapool.json").read_bytes()
    frozen = tmp_path / "frozen.json"
    frozen.write_text(json.dumps({
        "worker_config": {"use_datapool": True,
                          "datasource": {"enable_datapool_update": False}},
        "selection_config": {"n_samples": 5, "strategies": [DIVERSE]}}))
    assert _select(run, frozen) == 0
    assert not set(_picked(run)) & set(first)
    assert (run / "datapool.json").read_bytes() == record
