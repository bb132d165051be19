"""`pretag run --ray` on a real local Ray cluster (`ray start --head`): the same files as
the gRPC path, an actor killed mid-job, a driver killed and the job resumed, a cluster
that cannot be reached."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import psutil
import pytest

from pretag.job.run import RunConfig
from pretag.job.vectors import load_embeddings
from pretag.local import run_locally

# `ray start` enables token authentication when a token exists (~/.ray/auth_token);
# drivers joining the cluster must then opt in
RAY_ENV = {**os.environ, **({"RAY_AUTH_MODE": "token"}
                            if (Path.home() / ".ray" / "auth_token").exists() else {})}

pytestmark = pytest.mark.slow
ENV = RAY_ENV
SHARD = 16  # images per write block: predictions appear in steps the tests can catch
BROKEN = "broken.jpg"


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory, coco128: Path) -> Path:
    """coco128's 128 images (linked) and one file that is not an image."""
    folder = tmp_path_factory.mktemp("ray-input")
    for path in sorted((coco128 / "images").glob("*.jpg")):
        (folder / path.name).symlink_to(path)
    (folder / BROKEN).write_bytes(b"not an image at all")
    return folder


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, images: Path,
              yolox_model: Path) -> Path:
    """The gRPC path's outputs (embedded server) for the same files."""
    out = tmp_path_factory.mktemp("grpc-out")
    summary = run_locally(RunConfig(images, out, quiet=True, shard_images=SHARD), yolox_model)
    assert (summary.written, summary.failed) == (128, 1)
    return out


def _command(images: Path, out: Path, model: Path, *ray: str) -> list[str]:
    return [sys.executable, "-m", "pretag.cli", "run", str(images), "--output-dir", str(out),
            "--model", str(model), "--quiet", "--shard-images", str(SHARD), "--ray", *ray]


def _run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), capture_output=True, text=True, timeout=timeout, env=ENV)


def _files(root: Path) -> dict[str, bytes]:
    """Every output file but the binary ones (vectors, plot), by relative path."""
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*")
            if p.is_file() and p.suffix not in (".parquet", ".png")}


def assert_same_outputs(out: Path, reference: Path) -> None:
    """The same files, byte for byte, and the same vectors, each image's stored once."""
    got, want = _files(out), _files(reference)
    assert sorted(got) == sorted(want)
    assert [name for name in want if got[name] != want[name]] == []
    names, vectors = load_embeddings(out)
    ref_names, ref_vectors = load_embeddings(reference)
    assert Counter(names) == Counter(ref_names)
    assert max(Counter(names).values()) == 1
    order, ref_order = np.argsort(names), np.argsort(ref_names)
    assert np.array_equal(vectors[order], ref_vectors[ref_order])


def _predictions(out: Path) -> int:
    """Prediction files written (the task's tasks.json and schema.json are not)."""
    folder = out / ".lightly" / "predictions"
    return sum(1 for p in folder.rglob("*.json") if p.name not in ("tasks.json", "schema.json"))


def _wait_for_predictions(out: Path, count: int, proc: subprocess.Popen[str]) -> int:
    deadline = time.monotonic() + 240
    while (found := _predictions(out)) < count:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "no predictions written"
        time.sleep(0.02)
    return found


def test_ray_writes_what_the_grpc_path_writes(ray_cluster: str, images: Path,
                                               reference: Path, yolox_model: Path,
                                               tmp_path: Path):
    done = _run(*_command(images, tmp_path, yolox_model, ray_cluster))
    assert done.returncode == 3, done.stderr  # the broken file, as on the gRPC path
    assert "predicted now           128" in done.stdout
    assert_same_outputs(tmp_path, reference)
    errors = [json.loads(line) for line in (tmp_path / "report" / "errors.jsonl").open()]
    assert [(e["filename"], e["code"]) for e in errors] == [(BROKEN, "INVALID_ARGUMENT")]


def _detector_actors() -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        if "MapBatches(Detector)" in " ".join(proc.info["cmdline"] or []):
            found.append(proc)
    return found


def test_an_actor_killed_mid_job_costs_its_batch_not_the_job(ray_cluster: str, images: Path,
                                                             reference: Path,
                                                             yolox_model: Path,
                                                             tmp_path: Path):
    proc = subprocess.Popen(_command(images, tmp_path, yolox_model, ray_cluster),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    try:
        _wait_for_predictions(tmp_path, 1, proc)
        actors = _detector_actors()
        assert len(actors) == 1
        actors[0].send_signal(signal.SIGKILL)
        at_kill = _predictions(tmp_path)
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert at_kill < 128
    assert proc.returncode == 3, stderr
    assert "predicted now           128" in stdout  # each image recorded once
    assert_same_outputs(tmp_path, reference)
    assert [a.pid for a in _detector_actors()] == []  # the job's actors are gone with it


def test_a_killed_driver_is_resumed_by_the_same_command(ray_cluster: str, images: Path,
                                                        reference: Path, yolox_model: Path,
                                                        tmp_path: Path):
    command = _command(images, tmp_path, yolox_model, ray_cluster)
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=ENV)
    try:
        _wait_for_predictions(tmp_path, SHARD, proc)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        proc.kill()
    deadline = time.monotonic() + 60
    while _detector_actors():  # Ray ends a dead driver's job: its workers go
        assert time.monotonic() < deadline, "the killed job's actor lives on"
        time.sleep(0.2)
    before = _predictions(tmp_path)
    assert SHARD <= before < 128
    again = _run(*command)
    assert again.returncode == 3, again.stderr
    skipped = int(again.stdout.split("already done (skipped)")[1].split()[0])
    predicted = int(again.stdout.split("predicted now")[1].split()[0])
    assert skipped >= before - SHARD and skipped + predicted == 128
    assert_same_outputs(tmp_path, reference)


def test_a_cluster_that_cannot_be_reached_is_exit_2(images: Path, yolox_model: Path,
                                                    tmp_path: Path, unused_port: int):
    start = time.monotonic()
    done = _run(*_command(images, tmp_path / "out", yolox_model, f"127.0.0.1:{unused_port}"))
    assert done.returncode == 2
    assert "cannot be reached" in done.stderr and "ray start --head" in done.stderr
    assert time.monotonic() - start < 60
    assert not (tmp_path / "out").exists()  # nothing written before the cluster is joined


def test_without_an_address_a_local_cluster_is_started_for_the_job(
        ray_cluster: str, shared: Path, yolox_model: Path, tmp_path: Path):
    """Even beside a running cluster (--ray joins nothing it was not given)."""
    driving = shared / "data" / "driving"
    out = tmp_path / "out"
    done = _run(sys.executable, "-m", "pretag.cli", "run", str(driving), "--output-dir",
                str(out), "--model", str(yolox_model), "--quiet", "--ray")
    assert done.returncode == 0, done.stderr
    assert "ray local" in done.stdout
    assert _predictions(out) == len(list(driving.iterdir()))
    too_many = _run(sys.executable, "-m", "pretag.cli", "run", str(driving), "--output-dir",
                    str(tmp_path / "other"), "--model", str(yolox_model), "--ray",
                    "--ray-actors", str((os.cpu_count() or 1) + 1))
    assert too_many.returncode == 2
    assert "detector actors need" in too_many.stderr


def test_actors_that_cannot_start_stop_the_job_with_exit_2(ray_cluster: str, images: Path,
                                                           yolox_model: Path, tmp_path: Path):
    done = _run(*_command(images, tmp_path, yolox_model, ray_cluster, "--ray-providers",
                          "NoSuchExecutionProvider"))
    assert done.returncode == 2
    assert "the Ray pipeline failed" in done.stderr and "NoSuchExecutionProvider" in done.stderr
    assert _predictions(tmp_path) == 0


def test_object_vectors_too_equal_the_grpc_paths(ray_cluster: str, shared: Path,
                                                 yolox_model: Path, tmp_path: Path):
    driving = shared / "data" / "driving"
    grpc_out, ray_out = tmp_path / "grpc", tmp_path / "ray"
    run_locally(RunConfig(driving, grpc_out, quiet=True, embeddings="all"), yolox_model)
    done = _run(sys.executable, "-m", "pretag.cli", "run", str(driving), "--output-dir",
                str(ray_out), "--model", str(yolox_model), "--quiet", "--embeddings", "all",
                "--ray", ray_cluster)
    assert done.returncode == 0, done.stderr
    assert _files(ray_out) == _files(grpc_out)
    for kind in ("images", "objects"):
        got, want = load_embeddings(ray_out, kind), load_embeddings(grpc_out, kind)
        assert len(want[0]) > 0
        assert sorted(got[0]) == sorted(want[0])
        key = {n: i for i, n in enumerate(want[0])} if kind == "images" else None
        if key is not None:
            assert np.array_equal(got[1], want[1][[key[n] for n in got[0]]])
        else:  # one row per detection: compare as sets of (filename, vector bytes)
            assert sorted(zip(got[0], map(bytes, got[1]), strict=True)) == \
                sorted(zip(want[0], map(bytes, want[1]), strict=True))


def test_ray_stores_shards_without_detections(ray_cluster: str, coco128: Path,
                                              yolox_model: Path, tmp_path: Path):
    """A write block whose images have no detections (issue 29): before, exit 2 with
    Ray's retry text; now the gRPC path's files and every image's vector."""
    import cv2

    folder = tmp_path / "in"
    folder.mkdir()
    for path in sorted((coco128 / "images").glob("*.jpg"))[:6]:
        (folder / path.name).symlink_to(path)
    for i in range(5):
        cv2.imwrite(str(folder / f"blank-{i}.png"), np.full((96, 128, 3), 60 + i, np.uint8))
    reference = tmp_path / "grpc"
    summary = run_locally(RunConfig(folder, reference, quiet=True, shard_images=4,
                                    embeddings="all"), yolox_model)
    assert (summary.written, summary.failed) == (11, 0)
    out = tmp_path / "ray"
    command = [sys.executable, "-m", "pretag.cli", "run", str(folder), "--output-dir",
               str(out), "--model", str(yolox_model), "--quiet", "--shard-images", "4",
               "--embeddings", "all", "--ray", ray_cluster]
    done = _run(*command)
    assert done.returncode == 0, done.stderr
    assert_same_outputs(out, reference)
    objects = load_embeddings(out, "objects")[0]
    assert Counter(objects) == Counter(load_embeddings(reference, "objects")[0])
    again = _run(*command)
    assert again.returncode == 0 and "predicted now           0" in again.stdout, again.stderr


def test_videos_on_ray_write_what_the_grpc_path_writes(ray_cluster: str, shared: Path,
                                                       yolox_model: Path, tmp_path: Path):
    """Frames decoded in the read tasks (one task per video, in order) and the same video
    faults: the files of the gRPC path, errors.jsonl included."""
    import av

    from pretag.bench.video import make_video, pan_frames

    folder = tmp_path / "in"
    (folder / "sub").mkdir(parents=True)
    frames = pan_frames(sorted((shared / "data" / "driving").iterdir()), 90, (320, 180))
    make_video(folder / "sub" / "drive.mp4", frames, gop=30)
    make_video(folder / "clip.avi", frames[:20], codec="mpeg4")
    make_video(tmp_path / "whole.mp4", frames[:60], gop=30)
    with av.open(str(tmp_path / "whole.mp4")) as container:
        pos, size = [(p.pos, p.size) for p in container.demux(container.streams.video[0])
                     if p.size][40]
    data = bytearray((tmp_path / "whole.mp4").read_bytes())
    data[pos:pos + size] = b"\xff" * size  # a corrupt packet: decoding stops there
    (folder / "corrupt.mp4").write_bytes(bytes(data))
    (folder / "kitti.png").write_bytes((shared / "data" / "driving" / "kitti_000000.png")
                                       .read_bytes())
    grpc_out, ray_out = tmp_path / "grpc", tmp_path / "ray"
    summary = run_locally(RunConfig(folder, grpc_out, quiet=True, embeddings="image",
                                    shard_images=SHARD), yolox_model)
    assert summary.failed == 1 and summary.frames == 170 and summary.videos == 3
    done = _run(sys.executable, "-m", "pretag.cli", "run", str(folder), "--output-dir",
                str(ray_out), "--model", str(yolox_model), "--quiet", "--embeddings", "image",
                "--shard-images", str(SHARD), "--ray", ray_cluster)
    assert done.returncode == 3, done.stderr
    assert "frames of 3 videos" in done.stdout
    assert_same_outputs(ray_out, grpc_out)
    errors = [json.loads(line) for line in (ray_out / "report" / "errors.jsonl").open()]
    assert [(e["filename"], e["code"]) for e in errors] == [("corrupt.mp4", "VIDEO")]
