"""Faults of the job found by adversarial testing (issue 29): vector shards without
detections, FIFOs in list files, names the layout cannot hold, two jobs in one folder.

Each test failed on the code before the fix (a57afb3).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pyarrow.parquet as pq
import pytest

from pretag.cli import main
from pretag.job.lock import FolderBusy, hold, lock_path
from pretag.job.outputs import MAX_STEM_BYTES, TASK
from pretag.job.vectors import embeddings_dir, load_embeddings

pytestmark = pytest.mark.slow  # see the README: pytest -m "not slow"


def _blank(folder: Path, count: int, start: int = 0) -> list[str]:
    """Flat grey images: YOLOX finds nothing in them."""
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(start, start + count):
        name = f"blank-{i:02d}.png"
        cv2.imwrite(str(folder / name), np.full((96, 128, 3), 60 + i, np.uint8))
        names.append(name)
    return names


def _predictions(out: Path) -> dict[str, dict[str, Any]]:
    root = out / ".lightly" / "predictions" / TASK
    return {p.relative_to(root).as_posix(): json.loads(p.read_text())[0]
            for p in sorted(root.rglob("*.json")) if p != root / "schema.json"}


def _errors(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "report" / "errors.jsonl").open()]


def _object_rows(out: Path) -> list[tuple[str, int]]:
    rows = []
    for path in sorted(embeddings_dir(out).glob("objects-*.parquet")):
        table = pq.read_table(path, columns=["filename", "detection"])
        rows += list(zip(table["filename"].to_pylist(), table["detection"].to_pylist(),
                         strict=True))
    return rows


def _run(folder: Path, out: Path, model: Path, *more: str) -> int:
    return main(["run", str(folder), "--output-dir", str(out), "--model", str(model),
                 "--quiet", *more])


@pytest.fixture(scope="module")
def mixed(tmp_path_factory: pytest.TempPathFactory, coco128: Path) -> Path:
    """6 real images, then 5 blank ones: the last shard of 4 holds blank images only."""
    folder = tmp_path_factory.mktemp("mixed")
    for path in sorted((coco128 / "images").rglob("*.jpg"))[:6]:
        shutil.copy(path, folder / f"a-{path.name}")
    _blank(folder, 5)
    return folder


@pytest.mark.parametrize("shard", ["1024", "4"])
def test_shards_without_detections_store_every_vector(mixed: Path, yolox_model: Path,
                                                      tmp_path: Path, shard: str,
                                                      capsys: pytest.CaptureFixture[str]):
    out = tmp_path / "out"
    # before: ArrowInvalid (list_size 0), exit 1 or a VECTORS line, on every re-run
    assert _run(mixed, out, yolox_model, "--embeddings", "all", "--shard-images", shard) == 0
    names = sorted(p.name for p in mixed.iterdir())
    assert _errors(out) == []
    stored, vectors = load_embeddings(out)
    assert sorted(stored) == names and vectors.shape[0] == 11
    assert not any(_predictions(out)[f"{n[:-4]}.json"]["boxes"] for n in names
                   if n.startswith("blank"))
    objects = _object_rows(out)
    expected = sorted((name, i) for name, entry in
                      ((e["filename"], e) for e in _predictions(out).values())
                      for i in range(len(entry["boxes"])))
    assert sorted(objects) == expected and objects
    capsys.readouterr()
    assert _run(mixed, out, yolox_model, "--embeddings", "all", "--shard-images", shard) == 0
    assert "predicted now           0" in capsys.readouterr().out


def test_a_fifo_in_a_list_file_is_not_a_file(tmp_path: Path, yolox_model: Path):
    folder = tmp_path / "in"
    _blank(folder, 2)
    os.mkfifo(folder / "pipe.jpg")
    (tmp_path / "list.txt").write_text("in/blank-00.png\nin/pipe.jpg\nin/blank-01.png\n")
    proc = subprocess.run(  # before: stuck at 2 of 3 for ever
        [sys.executable, "-m", "pretag.cli", "run", str(tmp_path / "list.txt"),
         "--output-dir", str(tmp_path / "out"), "--model", str(yolox_model), "--quiet"],
        capture_output=True, text=True, timeout=120)
    assert proc.returncode == 3, proc.stderr
    assert [(e["filename"], e["code"]) for e in _errors(tmp_path / "out")] == [
        ("in/pipe.jpg", "NOT_A_FILE")]
    assert sorted(_predictions(tmp_path / "out")) == ["in/blank-00.json", "in/blank-01.json"]


def test_names_the_layout_cannot_hold_are_name_errors(tmp_path: Path, yolox_model: Path,
                                                      capsys: pytest.CaptureFixture[str]):
    folder = tmp_path / "in"
    _blank(folder, 1)
    (folder / "sub").mkdir()
    long_name = "x" * 246 + ".png"  # 250 bytes: ENAMETOOLONG on its .tmp before
    for name in ("new\nline.png", long_name, "schema.png", "sub/schema.png"):
        shutil.copy(folder / "blank-00.png", folder / name)
    out = tmp_path / "out"
    assert _run(folder, out, yolox_model, "--embeddings", "all") == 3
    errors = {e["filename"]: e for e in _errors(out)}
    assert sorted(errors) == sorted(["new\nline.png", long_name, "schema.png"])
    assert all(e["code"] == "NAME" for e in errors.values())
    assert "control character" in errors["new\nline.png"]["reason"]
    assert f"at most {MAX_STEM_BYTES}" in errors[long_name]["reason"]
    assert "schema" in errors["schema.png"]["reason"]
    schema = out / ".lightly" / "predictions" / TASK / "schema.json"
    assert json.loads(schema.read_text())["task_type"] == "object-detection"
    assert sorted(_predictions(out)) == ["blank-00.json", "sub/schema.json"]
    assert sorted(load_embeddings(out)[0]) == ["blank-00.png", "sub/schema.png"]
    capsys.readouterr()
    assert _run(folder, out, yolox_model, "--embeddings", "all") == 3
    assert "predicted now           0" in capsys.readouterr().out  # before: schema.jpg again

    # sub/schema.png is a sample of image-level selection (it was silently dropped);
    # as flat copies of one file they would be corrupt (blank) and exact duplicates, which
    # selection leaves out (job.health), so they get content of their own
    rng = np.random.default_rng(0)
    for name in ("blank-00.png", "sub/schema.png"):
        cv2.imwrite(str(folder / name), rng.integers(0, 255, (96, 128, 3), dtype=np.uint8))
    assert _run(folder, out, yolox_model, "--embeddings", "all", "--overwrite") == 3
    config = tmp_path / "select.json"
    config.write_text(json.dumps({"n_samples": 5, "strategies": [
        {"input": {"type": "EMBEDDINGS"}, "strategy": {"type": "DIVERSITY"}}]}))
    assert main(["select", str(out), "--config", str(config)]) == 0
    picked = (out / "selection" / "selected.txt").read_text().splitlines()
    assert sorted(picked) == ["blank-00.png", "sub/schema.png"]


def test_a_second_job_in_a_held_folder_is_refused(tmp_path: Path, yolox_model: Path,
                                                  caplog: pytest.LogCaptureFixture):
    folder = tmp_path / "in"
    _blank(folder, 2)
    out = tmp_path / "out"
    with hold(out, "pretag run"):  # a real flock, as another process's run holds it
        assert _run(folder, out, yolox_model) == 2
        assert f"pid {os.getpid()}" in caplog.text and "in use by pretag run" in caplog.text
        with pytest.raises(FolderBusy), hold(out, "pretag select"):
            pass
    assert not (out / ".lightly" / "predictions" / TASK).exists()
    assert _run(folder, out, yolox_model) == 0  # released


def test_a_lock_left_by_a_killed_job_is_taken_over(tmp_path: Path, yolox_model: Path,
                                                   caplog: pytest.LogCaptureFixture):
    folder = tmp_path / "in"
    _blank(folder, 2)
    out = tmp_path / "out"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom pathlib import Path\n"
         "from pretag.job.lock import hold\n"
         "with hold(Path(sys.argv[1])):\n    print('held', flush=True)\n    time.sleep(600)\n",
         str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        assert _run(folder, out, yolox_model) == 2
        holder.kill()  # SIGKILL: no chance to release anything
        holder.wait(30)
    finally:
        holder.kill()
    assert json.loads(Path(lock_path(out)).read_text())["pid"] == holder.pid  # left behind
    caplog.clear()
    assert _run(folder, out, yolox_model) == 0
    assert "taking over" in caplog.text and f"pid {holder.pid}" in caplog.text
    assert Path(lock_path(out)).read_text() == ""  # released at the end


def test_two_runs_started_together_one_is_refused(tmp_path: Path, yolox_model: Path,
                                                  coco128: Path):
    """Two real processes into one folder: before, both exited 0 and their shards
    overwrote each other (images stored twice, others with no vector)."""
    folder = tmp_path / "in"
    folder.mkdir()
    for copy in range(3):  # long enough (about 8 s here) for the second to start
        for path in sorted((coco128 / "images").rglob("*.jpg")):
            (folder / f"{copy}-{path.name}").symlink_to(path)
    command = [sys.executable, "-m", "pretag.cli", "run", str(folder), "--output-dir",
               str(tmp_path / "out"), "--model", str(yolox_model), "--quiet",
               "--shard-images", "4", "--embeddings", "all"]
    first = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (lock_path(tmp_path / "out").exists()
               and Path(lock_path(tmp_path / "out")).read_text()):
        assert first.poll() is None and time.monotonic() < deadline, first.communicate()
        time.sleep(0.02)
    second = subprocess.run(command, capture_output=True, text=True, timeout=120)
    _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    assert second.returncode == 2 and f"pid {first.pid}" in second.stderr, second.stderr
    names, _ = load_embeddings(tmp_path / "out")
    assert Counter(names) == Counter(p.name for p in folder.iterdir())
    assert max(Counter(_object_rows(tmp_path / "out")).values()) == 1


def test_a_new_source_plugs_into_the_job_without_edits(tmp_path: Path, yolox_model: Path,
                                                       monkeypatch: pytest.MonkeyPatch):
    """The input seam: a source added to SOURCES is listed, predicted and resumed."""
    from dataclasses import dataclass

    from pretag.job import sources

    folder = tmp_path / "frames"
    names = _blank(folder, 3)

    @dataclass(frozen=True)
    class Numbered:
        """Claims inputs named `*.frames`: each file under it as `take-N.png`."""

        root: Path

        def list(self) -> sources.Listing:
            return sources.Listing([sources.ImageItem(self.root / n, f"take-{i}.png")
                                    for i, n in enumerate(names)], [])

    def numbered(path: Any) -> sources.Source | None:
        return Numbered(folder) if str(path).endswith(".frames") else None

    monkeypatch.setattr(sources, "SOURCES", (numbered, *sources.SOURCES))
    out = tmp_path / "out"
    assert _run(tmp_path / "camera.frames", out, yolox_model) == 0
    assert sorted(_predictions(out)) == ["take-0.json", "take-1.json", "take-2.json"]
    assert _run(folder, tmp_path / "plain", yolox_model) == 0  # the others still claim theirs
