"""`pretag run` with its input and output on S3: a real S3 API (moto's standalone server on a
local port) reached through s3fs, as a user's AWS_ENDPOINT_URL would point it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from pretag.cli import main

pytestmark = pytest.mark.slow  # see the README: pytest -m "not slow"

# `ray start` enables token authentication when a token exists (~/.ray/auth_token);
# drivers joining the cluster must then opt in
RAY_AUTH = {"RAY_AUTH_MODE": "token"} if (Path.home() / ".ray" / "auth_token").exists() else {}

IMAGES = 12


class MotoServer:
    """moto's standalone S3 server in a subprocess."""

    def __init__(self, port: int, **env: str) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, **env})
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(self.url + "/moto-api/", timeout=1).close()
                return
            except OSError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise AssertionError("moto server did not start") from None
                time.sleep(0.2)

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait(30)


def _use(server: MotoServer, monkeypatch: pytest.MonkeyPatch) -> None:
    import s3fs

    for key, value in {"AWS_ENDPOINT_URL": server.url, "AWS_ACCESS_KEY_ID": "testing",
                       "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(key, value)
    s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture(scope="module")
def moto(free_ports: Callable[[], int]) -> Iterator[MotoServer]:
    server = MotoServer(free_ports())
    yield server
    server.stop()


@pytest.fixture()
def s3(moto: MotoServer, monkeypatch: pytest.MonkeyPatch, coco128: Path):
    """An S3 filesystem with bucket ``data`` holding 12 coco128 images under images/."""
    import s3fs

    _use(moto, monkeypatch)
    fs = s3fs.S3FileSystem()
    for bucket in ("data", "out"):
        if fs.exists(bucket):
            fs.rm(bucket, recursive=True)
        fs.mkdir(bucket)
    for path in sorted((coco128 / "images").rglob("*.jpg"))[:IMAGES]:
        fs.pipe_file(f"data/images/{path.name}", path.read_bytes())
    return fs


def _predictions(fs, prefix: str) -> dict[str, list]:
    root = f"{prefix}/.lightly/predictions/lightly_pretagging"
    return {p.rsplit("/", 1)[-1]: json.loads(fs.cat_file(p)) for p in fs.find(root)
            if not p.endswith("schema.json")}


def test_input_and_output_on_s3_match_a_local_run(s3, yolox_model: Path, coco128: Path,
                                                  tmp_path: Path):
    local_in = tmp_path / "images"
    local_in.mkdir()
    for path in sorted((coco128 / "images").rglob("*.jpg"))[:IMAGES]:
        (local_in / path.name).write_bytes(path.read_bytes())
    assert main(["run", str(local_in), "--output-dir", str(tmp_path / "out"), "--model",
                 str(yolox_model), "--quiet"]) == 0
    assert main(["run", "s3://data/images/", "--output-dir", "s3://out/run/", "--model",
                 str(yolox_model), "--quiet", "--debug-images", "2"]) == 0
    remote = _predictions(s3, "out/run")
    local = {p.name: json.loads(p.read_text()) for p in
             (tmp_path / "out" / ".lightly" / "predictions" / "lightly_pretagging").glob("*")
             if p.name != "schema.json"}
    assert len(remote) == IMAGES and remote == local
    for key in ("report/class_histogram.json", "report/class_histogram.png",
                "report/run_settings.json", "report/errors.jsonl",
                ".lightly/predictions/tasks.json"):
        assert s3.exists(f"out/run/{key}"), key
    assert len(s3.find("out/run/report/debug")) == 2
    shards = s3.find("out/run/.lightly/embeddings/lightly_pretagging")
    assert [p.rsplit("/", 1)[-1] for p in shards] == ["images-000001.parquet"]
    assert not [p for p in s3.find("out/run") if p.endswith(".tmp")]
    histogram = json.loads(s3.cat_file("out/run/report/class_histogram.json"))
    assert histogram["images"] == IMAGES


def test_a_video_on_s3_is_read_through_fsspec_as_a_local_one(
        s3, yolox_model: Path, shared: Path, tmp_path: Path, capsys: pytest.CaptureFixture):
    """A clip in the bucket: listed with its size, probed and decoded from an fsspec file
    object (range reads), its frames named and predicted as from a local copy; a resumed
    run reads nothing again."""
    from pretag.bench.video import make_video, pan_frames

    clip = make_video(tmp_path / "drive.mp4", pan_frames(
        sorted((shared / "data" / "driving").iterdir()), 45, (320, 180)), gop=15)
    s3.pipe_file("data/videos/sub/drive.mp4", clip.read_bytes())
    local = tmp_path / "in" / "sub"
    local.mkdir(parents=True)
    (local / "drive.mp4").write_bytes(clip.read_bytes())
    assert main(["run", str(local.parent), "--output-dir", str(tmp_path / "out"), "--model",
                 str(yolox_model), "--quiet"]) == 0
    assert main(["run", "s3://data/videos/", "--output-dir", "s3://out/video/", "--model",
                 str(yolox_model), "--quiet", "--debug-images", "1"]) == 0
    remote = _predictions(s3, "out/video")
    want = {p.name: json.loads(p.read_text()) for p in
            (tmp_path / "out" / ".lightly" / "predictions" / "lightly_pretagging" / "sub")
            .glob("*.json")}
    assert sorted(remote) == [f"drive-{k:02d}-mp4.json" for k in range(45)]
    assert remote == want
    assert len(s3.find("out/video/report/debug")) == 1
    capsys.readouterr()
    assert main(["run", "s3://data/videos/", "--output-dir", "s3://out/video/", "--model",
                 str(yolox_model), "--quiet"]) == 0
    assert "predicted now           0" in capsys.readouterr().out


def test_resume_and_overwrite_on_s3(s3, yolox_model: Path, capsys: pytest.CaptureFixture,
                                    monkeypatch: pytest.MonkeyPatch):
    args = ["run", "s3://data/images", "--output-dir", "s3://out/job", "--model",
            str(yolox_model), "--quiet", "--shard-images", "4"]
    assert main(args) == 0
    first = _predictions(s3, "out/job")
    root = "out/job/.lightly/predictions/lightly_pretagging"
    gone = sorted(s3.find(root))[:5]
    s3.rm(gone)  # as if the job had been killed before writing them
    capsys.readouterr()
    from pretag.job import run

    reads: list[str] = []
    real_read = run.read_prediction
    monkeypatch.setattr(run, "read_prediction",
                        lambda out, name: reads.append(name) or real_read(out, name))
    assert main(args) == 0
    assert len(reads) == 7  # one listing, then a GET only for each prediction it found
    from pretag.job import stream

    stats: list[object] = []
    monkeypatch.setattr(stream, "file_size", lambda path: stats.append(path) or 0)
    summary = capsys.readouterr().out
    assert "already done (skipped)  7" in summary and "predicted now           5" in summary
    assert _predictions(s3, "out/job") == first
    assert main([*args, "--score-threshold", "0.6"]) == 2  # other settings: refused
    assert main([*args, "--score-threshold", "0.6", "--overwrite"]) == 0
    assert "predicted now           12" in capsys.readouterr().out
    assert stats == []  # the listing gave every size: no stat per object
    assert all(min(e[0]["scores"], default=1) >= 0.6 for e in _predictions(s3, "out/job")
               .values())


def test_missing_bucket_and_denied_access_exit_2(s3, yolox_model: Path,
                                                 monkeypatch: pytest.MonkeyPatch,
                                                 caplog: pytest.LogCaptureFixture,
                                                 free_ports: Callable[[], int]):
    model = ["--model", str(yolox_model), "--quiet"]
    assert main(["run", "s3://data/images", "--output-dir", "s3://no-such-bucket/x",
                 *model]) == 2
    assert "bucket no-such-bucket does not exist" in caplog.text
    assert main(["run", "s3://no-such-bucket/images", "--output-dir", "s3://out/x",
                 *model]) == 2
    assert "does not exist" in caplog.text
    # every unknown key is refused
    locked = MotoServer(free_ports(), INITIAL_NO_AUTH_ACTION_COUNT="0")
    try:
        _use(locked, monkeypatch)
        caplog.clear()
        assert main(["run", "s3://data/images", "--output-dir", "s3://out/x", *model]) == 2
        assert "denied" in caplog.text.lower() or "forbidden" in caplog.text.lower()
    finally:
        locked.stop()


def test_ray_job_on_s3_writes_what_the_grpc_path_writes(s3, ray_cluster: str,
                                                        yolox_model: Path):
    """Input and output on S3 through a real Ray cluster whose workers were started
    without any AWS settings: the endpoint and region reach them by default, the
    credentials because --ray-env names them."""
    assert main(["run", "s3://data/images", "--output-dir", "s3://out/grpc", "--model",
                 str(yolox_model), "--quiet"]) == 0
    done = subprocess.run(
        [sys.executable, "-m", "pretag.cli", "run", "s3://data/images", "--output-dir",
         "s3://out/ray", "--model", str(yolox_model), "--quiet", "--ray", ray_cluster,
         "--ray-env", "AWS_ACCESS_KEY_ID", "--ray-env", "AWS_SECRET_ACCESS_KEY"],
        capture_output=True, text=True, timeout=300,
        env={**os.environ, **RAY_AUTH})
    assert done.returncode == 0, done.stderr
    ray, grpc = _predictions(s3, "out/ray"), _predictions(s3, "out/grpc")
    assert len(ray) == IMAGES and ray == grpc
    for key in ("report/class_histogram.json", "report/errors.jsonl",
                ".lightly/predictions/tasks.json"):
        assert s3.cat_file(f"out/ray/{key}") == s3.cat_file(f"out/grpc/{key}"), key
    assert s3.find("out/ray/.lightly/embeddings/lightly_pretagging")
    assert not [p for p in s3.find("out/ray") if p.endswith(".tmp")]


def _fill(server: MotoServer, coco128: Path, count: int) -> Any:
    """A fresh bucket ``data`` with ``count`` coco128 images, and bucket ``out``."""
    import s3fs

    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": server.url}, key="testing",
                           secret="testing")
    fs.mkdir("data")
    fs.mkdir("out")
    for i, path in enumerate(sorted((coco128 / "images").rglob("*.jpg"))[:count]):
        fs.pipe_file(f"data/images/{i:03d}-{path.name}", path.read_bytes())
    return fs


def _job(server: MotoServer, yolox_model: Path) -> tuple[list[str], dict[str, str]]:
    env = {**os.environ, "AWS_ENDPOINT_URL": server.url, "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    return ([sys.executable, "-m", "pretag.cli", "run", "s3://data/images", "--output-dir",
             "s3://out/run", "--model", str(yolox_model), "--quiet", "--shard-images", "4",
             "--window", "4", "--storage-timeout-s", "2"], env)


def _start_and_wait(command: list[str], env: dict[str, str], fs: Any,
                    predictions: int) -> subprocess.Popen[str]:
    """The job, once it has written ``predictions`` prediction files."""
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    root = "out/run/.lightly/predictions/lightly_pretagging"
    deadline = time.monotonic() + 120
    while True:
        fs.invalidate_cache()
        found = [p for p in (fs.find(root) if fs.exists(root) else [])
                 if not p.endswith("schema.json")]
        if len(found) >= predictions:
            return proc
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "no predictions written"
        time.sleep(0.05)


def test_a_frozen_store_ends_the_run_with_exit_2_and_a_rerun_finishes(
        coco128: Path, yolox_model: Path, free_ports: Callable[[], int]):
    """moto under SIGSTOP: before, `pretag run` blamed the detector and never exited."""
    server = MotoServer(free_ports())
    try:
        fs = _fill(server, coco128, 64)
        command, env = _job(server, yolox_model)
        proc = _start_and_wait(command, env, fs, 8)
        os.kill(server.proc.pid, signal.SIGSTOP)
        frozen = time.monotonic()
        try:
            _, stderr = proc.communicate(timeout=120)
        finally:
            proc.kill()
            os.kill(server.proc.pid, signal.SIGCONT)
        took = time.monotonic() - frozen
        assert proc.returncode == 2, stderr
        assert f"the store at {server.url} does not answer" in stderr
        assert "run the same command again" in stderr and "Traceback" not in stderr
        assert "giving up on" not in stderr and "no server answered" not in stderr
        assert took < 60, f"{took:.0f} s"
        again = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
        assert again.returncode == 0, again.stderr
        fs.invalidate_cache()
        predictions = _predictions(fs, "out/run")
        assert len(predictions) == 64
        shards = [p for p in fs.find("out/run/.lightly/embeddings") if "images-" in p]
        names = [n for p in shards for n in pq.read_table(fs.open(p))["filename"].to_pylist()]
        assert sorted(names) == sorted(p.rsplit("/", 1)[-1]
                                       for p in fs.ls("data/images", detail=False))
        assert not fs.exists("out/run/.lightly/pretag.lock")
    finally:
        server.proc.send_signal(signal.SIGCONT)
        server.stop()


def test_a_store_killed_mid_run_is_exit_2_without_a_traceback(
        coco128: Path, yolox_model: Path, free_ports: Callable[[], int]):
    server = MotoServer(free_ports())
    try:
        fs = _fill(server, coco128, 64)
        command, env = _job(server, yolox_model)
        proc = _start_and_wait(command, env, fs, 8)
        server.stop()
        try:
            _, stderr = proc.communicate(timeout=120)
        finally:
            proc.kill()
        assert proc.returncode == 2, stderr  # before: exit 1, four EndpointConnectionErrors
        assert f"the store at {server.url} does not answer" in stderr, stderr
        assert "Traceback" not in stderr
    finally:
        server.stop()


def test_a_held_output_prefix_refuses_a_second_job_and_a_stale_lease_is_taken_over(
        s3, yolox_model: Path, caplog: pytest.LogCaptureFixture):
    from pretag.job.lock import STALE_S, FolderBusy, hold, lock_path
    from pretag.job.storage import location

    out = location("s3://out/held")
    args = ["run", "s3://data/images", "--output-dir", "s3://out/held", "--model",
            str(yolox_model), "--quiet"]
    with hold(out, "pretag run"):
        assert s3.exists("out/held/.lightly/pretag.lock")
        with pytest.raises(FolderBusy, match=f"pid {os.getpid()}"), hold(out, "another run"):
            pass
        assert main(args) == 2
        assert "is in use by pretag run" in caplog.text
    assert not s3.exists("out/held/.lightly/pretag.lock")
    stale = {"owner": "gone", "what": "pretag run", "host": "elsewhere", "pid": 1,
             "command": "pretag run ...", "started": time.time() - 2 * STALE_S,
             "heartbeat": time.time() - STALE_S - 5}
    lock_path(out).write_text(json.dumps(stale))
    caplog.clear()
    assert main(args) == 0
    assert "taking over" in caplog.text and "elsewhere" in caplog.text
    assert not s3.exists("out/held/.lightly/pretag.lock")
