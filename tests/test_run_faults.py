"""`pretag run` under faults: frozen servers, oversized files, escaping paths, a small
server queue, a full disk, entries that are not files, a threshold below the model's floor.

Each test failed on the code before issue 11's fixes.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from pretag.cli import main
from pretag.job.outputs import TASK
from pretag.job.run import RunConfig, run_job
from pretag.job.stream import RunError, StreamSettings
from pretag.server.app import BackgroundServer
from pretag.server.config import server_config

pytestmark = pytest.mark.slow  # see the README: pytest -m "not slow"

StartServe = Callable[..., Any]


def _prediction_files(out: Path) -> dict[str, dict[str, Any]]:
    root = out / ".lightly" / "predictions" / TASK
    return {p.relative_to(root).as_posix(): json.loads(p.read_text())[0]
            for p in sorted(root.rglob("*.json")) if p.name != "schema.json"}


def _errors(out: Path) -> list[dict[str, Any]]:
    text = (out / "report" / "errors.jsonl").read_text()
    return [json.loads(line) for line in text.splitlines()]


def _images(coco128: Path, folder: Path, count: int, start: int = 60) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    picked = sorted(coco128.glob("images/**/*.jpg"))[start:start + count]
    return [Path(shutil.copy(p, folder / p.name)) for p in picked]


def test_a_frozen_server_s_images_finish_on_the_other(yolox_model: Path, coco128: Path,
                                                      tmp_path: Path,
                                                      serve_process: StartServe):
    servers = [serve_process("--model", str(yolox_model), "--host", "127.0.0.1", "--port",
                             "0", "--no-metrics", "--max-batch-size", "4") for _ in range(2)]
    ports = [s.wait_ready() for s in servers]
    victim = servers[0]
    frozen_at: list[int] = []

    def on_result(name: str, ok: bool) -> None:
        if not frozen_at and ok:
            frozen_at.append(1)
            os.kill(victim.proc.pid, signal.SIGSTOP)  # alive, connected, answering nothing

    config = RunConfig(coco128, tmp_path / "out", servers=tuple(f"127.0.0.1:{p}" for p in ports),
                       quiet=True,
                       stream=StreamSettings(window=8, server_timeout_s=3))
    start = time.monotonic()
    summary = run_job(config, on_result=on_result)
    took = time.monotonic() - start
    assert frozen_at and summary.written == 128 and summary.failed == 0
    assert len(_prediction_files(tmp_path / "out")) == 128
    assert took < 90, f"{took:.0f} s"

    # one server, frozen mid-run: a clear error (exit 2), not a hang
    os.kill(victim.proc.pid, signal.SIGCONT)
    only = RunConfig(coco128, tmp_path / "one", servers=(f"127.0.0.1:{ports[1]}",),
                     quiet=True,
                       stream=StreamSettings(window=8, server_timeout_s=3))
    frozen_at.clear()
    victim = servers[1]
    start = time.monotonic()
    with pytest.raises(RunError, match="no server answered for 3 s"):
        run_job(only, on_result=on_result)
    assert time.monotonic() - start < 60


def test_a_file_over_the_message_limit_is_reported_and_the_rest_predicted(
        yolox_model: Path, coco128: Path, tmp_path: Path):
    folder = tmp_path / "in"
    good = _images(coco128, folder, 8)
    big = np.random.default_rng(0).integers(0, 255, (1100, 1100, 3), np.uint8)
    cv2.imwrite(str(folder / "huge.bmp"), big)  # 3.6 MB, the server takes 1 MB messages
    with BackgroundServer(server_config(model=yolox_model, host="127.0.0.1", port=0,
                                       metrics_port=None, max_message_mb=1)) as srv:
        out = tmp_path / "out"
        code = main(["run", str(folder), "--output-dir", str(out), "--server",
                     f"127.0.0.1:{srv.port}", "--quiet"])
    assert code == 3
    assert sorted(_prediction_files(out)) == sorted(f"{p.stem}.json" for p in good)
    [error] = _errors(out)
    assert error["filename"] == "huge.bmp" and error["code"] == "TOO_LARGE"
    assert "MiB" in error["reason"]


def test_list_file_names_stay_inside_the_task_folder(yolox_model: Path, coco128: Path,
                                                     tmp_path: Path):
    (tmp_path / "data" / "lists").mkdir(parents=True)
    a, b, c = _images(coco128, tmp_path / "data" / "images", 3)
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "config.json").write_text("{}")  # what a careless --overwrite would delete
    ups = "../" * (len(tmp_path.parts) + 3)
    listing = tmp_path / "data" / "lists" / "todo.txt"
    listing.write_text(f"../images/{a.name}\n{ups}{str(b)[1:]}\n{c}\n{victim}/config.jpg\n"
                       f"./../lists/../images/{a.name}\n")
    out = tmp_path / "data" / "out"
    before = sorted(p for p in tmp_path.rglob("*") if out not in p.parents)
    for extra in ([], ["--overwrite"]):
        code = main(["run", str(listing), "--output-dir", str(out), "--model",
                     str(yolox_model), "--quiet", *extra])
        assert code == 3  # the missing config.jpg, and the second name for a.jpg
    after = sorted(p for p in tmp_path.rglob("*") if out not in p.parents and p != out)
    assert after == before and (victim / "config.json").read_text() == "{}"
    data = tmp_path.relative_to("/").as_posix() + "/data"
    assert sorted(_prediction_files(out)) == sorted(
        f"{data}/images/{p.stem}.json" for p in (a, b, c))
    codes = sorted((e["filename"], e["code"]) for e in _errors(out))
    assert codes == [(f"{data}/images/{a.name}", "NAME"),
                     (f"{victim.relative_to('/').as_posix()}/config.jpg", "READ")]


def test_window_beyond_the_server_queue_is_held_within_it(yolox_model: Path, coco128: Path,
                                                          tmp_path: Path):
    folder = tmp_path / "in"
    _images(coco128, folder, 32)
    with BackgroundServer(server_config(model=yolox_model, host="127.0.0.1", port=0,
                                       metrics_port=None, max_queue=4,
                                       max_batch_size=2)) as srv:
        summary = run_job(RunConfig(folder, tmp_path / "out", servers=(f"127.0.0.1:{srv.port}",),
                                    quiet=True,
                                    stream=StreamSettings(window=32)))
        assert srv.server is not None
        refused = srv.server.metrics.registry.get_sample_value(
            "pretag_requests_total", {"method": "DetectStream", "code": "RESOURCE_EXHAUSTED"})
    assert summary.written == 32
    assert not refused  # before: most of each window was refused and retried after backoff


DISK_FULL = """
set -u
mount -t tmpfs -o size=96k tmpfs "$OUT"
"$PY" -m pretag.cli run "$IN" --output-dir "$OUT" --model "$MODEL" --quiet --window 4
echo "first=$?"
mount -o remount,size=16m "$OUT"
"$PY" -m pretag.cli run "$IN" --output-dir "$OUT" --model "$MODEL" --quiet --window 4
echo "second=$?"
cp -a "$OUT/." "$COPY/"
"""


def test_a_full_disk_stops_the_run_early_and_a_rerun_finishes_it(yolox_model: Path,
                                                                 coco128: Path,
                                                                 tmp_path: Path):
    """A real 96 KiB tmpfs in a private mount namespace (no privileges needed)."""
    (tmp_path / "out").mkdir()
    (tmp_path / "copy").mkdir()
    env = {**os.environ, "OUT": str(tmp_path / "out"), "COPY": str(tmp_path / "copy"),
           "IN": str(coco128), "MODEL": str(yolox_model), "PY": sys.executable}
    proc = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
                           DISK_FULL], env=env, capture_output=True, text=True, timeout=300)
    assert "first=2" in proc.stdout and "second=0" in proc.stdout, proc.stdout + proc.stderr
    assert "No space left on device" in proc.stderr and "free space and run" in proc.stderr
    stopped = next(line for line in proc.stderr.splitlines() if "Stopped with" in line)
    written = int(stopped.split("Stopped with ")[1].split()[0])
    assert 0 < written < 100  # it stopped at the first failed write, not after every image
    files = _prediction_files(tmp_path / "copy")  # every file parses: nothing half-written
    assert len(files) == 128
    assert json.loads((tmp_path / "copy" / "report" / "class_histogram.json").read_text())[
        "images"] == 128


def test_entries_that_are_not_files_are_reported(yolox_model: Path, coco128: Path,
                                                 tmp_path: Path):
    folder = tmp_path / "in"
    good = _images(coco128, folder, 2)
    (folder / "dangling.jpg").symlink_to(tmp_path / "nowhere.jpg")
    (folder / "album.jpg").mkdir()
    out = tmp_path / "out"
    code = main(["run", str(folder), "--output-dir", str(out), "--model", str(yolox_model),
                 "--quiet"])
    assert code == 3
    assert len(_prediction_files(out)) == len(good)
    reasons = {e["filename"]: (e["code"], e["reason"]) for e in _errors(out)}
    assert reasons == {"album.jpg": ("NOT_A_FILE", "has an image suffix but is a directory"),
                       "dangling.jpg": ("NOT_A_FILE",
                                        "has an image suffix but is a broken symbolic link")}


def test_a_threshold_below_the_model_floor_records_the_floor(yolox_model: Path,
                                                             coco128: Path, tmp_path: Path,
                                                             caplog: pytest.LogCaptureFixture):
    folder = tmp_path / "in"
    _images(coco128, folder, 3)
    out = tmp_path / "out"
    code = main(["run", str(folder), "--output-dir", str(out), "--model", str(yolox_model),
                 "--quiet", "--score-threshold", "0.01"])
    assert code == 0
    assert "below the lowest score" in caplog.text
    settings = json.loads((out / "report" / "run_settings.json").read_text())
    histogram = json.loads((out / "report" / "class_histogram.json").read_text())
    assert settings["score_threshold"] == pytest.approx(0.05)
    assert histogram["score_threshold"] == pytest.approx(0.05)
    assert min(s for e in _prediction_files(out).values() for s in e["scores"]) >= 0.05
