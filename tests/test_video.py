"""Video input (issue 21): frames named as the Lightly Worker names them, sent as pixels,
resumed per frame from a keyframe, and broken videos reported with what was read.

The videos are made here from the shared driving frames (pretag.bench.video)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import cv2
import numpy as np
import pyarrow.parquet as pq
import pytest

from pretag.bench.video import cut, make_video, pan_frames
from pretag.cli import main
from pretag.job.outputs import TASK
from pretag.job.vectors import embeddings_dir
from pretag.job.video import FrameReader, FrameSettings, Video, VideoError, kept, probe

pytestmark = pytest.mark.slow  # see the README: pytest -m "not slow"


@pytest.fixture(scope="module")
def frames(shared: Path) -> list[np.ndarray]:
    """300 RGB frames, 320x180, panning across the 11 driving images."""
    return pan_frames(sorted((shared / "data" / "driving").iterdir()), 300, (320, 180))


def _predictions(out: Path) -> dict[str, dict[str, Any]]:
    root = out / ".lightly" / "predictions" / TASK
    return {p.relative_to(root).as_posix(): json.loads(p.read_text())[0]
            for p in sorted(root.rglob("*.json")) if p != root / "schema.json"}


def _errors(out: Path) -> list[dict[str, Any]]:
    path = out / "report" / "errors.jsonl"
    return [json.loads(line) for line in path.open()] if path.exists() else []


def _run(folder: Path, out: Path, model: Path, *more: str) -> int:
    return main(["run", str(folder), "--output-dir", str(out), "--model", str(model),
                 "--quiet", *more])


def test_frames_are_named_as_lightly_and_predicted_as_the_same_pixels_would_be(
        tmp_path: Path, frames: list[np.ndarray], shared: Path, yolox_model: Path,
        capsys: pytest.CaptureFixture[str]):
    folder = tmp_path / "in"
    (folder / "sub").mkdir(parents=True)
    make_video(folder / "sub" / "drive.mp4", frames[:120], gop=30)  # H.264
    odd = pan_frames(sorted((shared / "data" / "driving").iterdir())[:3], 15, (321, 181))
    make_video(folder / "clip.AVI", odd, codec="mpeg4", gop=5)  # MPEG-4 Part 2, odd size
    (folder / "kitti.png").write_bytes((shared / "data" / "driving" / "kitti_000000.png")
                                       .read_bytes())
    out = tmp_path / "out"
    assert _run(folder, out, yolox_model, "--embeddings", "image", "--debug-images", "4") == 0
    said = capsys.readouterr().out
    assert "136 (1 image, 135 frames of 2 videos)" in said
    found = _predictions(out)
    assert sorted(found) == sorted(["kitti.json",
                                    *(f"sub/drive-{k:03d}-mp4.json" for k in range(120)),
                                    *(f"clip-{k:02d}-AVI.json" for k in range(15))])
    assert found["sub/drive-099-mp4.json"]["filename"] == "sub/drive-099-mp4.png"
    assert sum(len(e["boxes"]) for e in found.values()) > 100
    table = pq.read_table(sorted(embeddings_dir(out).glob("images-*.parquet"))[0])
    assert sorted(table["filename"].to_pylist()) == sorted(e["filename"]
                                                           for e in found.values())
    assert len(list((out / "report" / "debug").glob("*.jpg"))) == 4

    # the same decoded frames as lossless PNG files, run as images: the same detections
    video = probe(folder / "sub" / "drive.mp4", "sub/drive.mp4", 10**8)
    stills = tmp_path / "stills" / "sub"
    stills.mkdir(parents=True)
    for index, image, original in FrameReader(video, [0, 57, 119]):
        assert original == (180, 320) and image.shape == (180, 320, 3)
        assert cv2.imwrite(str(stills.parent / video.frame_name(index)), image)
    assert _run(stills.parent, tmp_path / "out_stills", yolox_model) == 0
    for name, entry in _predictions(tmp_path / "out_stills").items():
        frame = found[name]
        assert entry["labels"] == frame["labels"] and entry["filename"] == frame["filename"]
        np.testing.assert_allclose(entry["boxes"], frame["boxes"], atol=1e-6)
        np.testing.assert_allclose(entry["scores"], frame["scores"], atol=1e-6)


def test_stride_and_fps_keep_the_frame_numbers_also_at_a_variable_rate(
        tmp_path: Path, frames: list[np.ndarray], yolox_model: Path,
        caplog: pytest.LogCaptureFixture):
    folder = tmp_path / "in"
    folder.mkdir()
    make_video(folder / "a.mp4", frames[:30], fps=30)
    assert _run(folder, tmp_path / "stride", yolox_model, "--frame-stride", "10") == 0
    assert sorted(_predictions(tmp_path / "stride")) == ["a-00-mp4.json", "a-10-mp4.json",
                                                         "a-20-mp4.json"]
    listed = tmp_path / "list.txt"  # a list file may name videos too
    listed.write_text("in/a.mp4\n")
    assert _run(listed, tmp_path / "listed", yolox_model, "--frame-stride", "10") == 0
    assert sorted(_predictions(tmp_path / "listed")) == ["in/a-00-mp4.json",
                                                         "in/a-10-mp4.json", "in/a-20-mp4.json"]
    assert _run(folder, tmp_path / "fps", yolox_model, "--fps", "5") == 0
    assert sorted(_predictions(tmp_path / "fps")) == [f"a-{k:02d}-mp4.json"
                                                      for k in range(0, 30, 6)]
    assert _run(folder, tmp_path / "both", yolox_model, "--fps", "5",
                "--frame-stride", "2") == 2
    assert "--fps and --frame-stride" in caplog.text

    # variable frame rate: a burst, a pause, a burst; --fps 2 picks by timestamp
    times = [0.0, 0.1, 0.2, 0.3, 1.5, 1.6, 1.7, 2.9, 3.0]
    make_video(tmp_path / "vfr.mp4", frames[:len(times)], times_s=times)
    video = probe(tmp_path / "vfr.mp4", "vfr.mp4", 10**8)
    assert video.frames == len(times)
    assert [round(video.seconds(k), 3) for k in range(video.frames)] == times
    assert kept(video, FrameSettings(fps=2)) == [0, 4, 7, 8]  # t = 0, 1.5, 2.9, 3
    read = [index for index, _, _ in FrameReader(video, [1, 5, 8])]
    assert read == [1, 5, 8]


def test_a_rotated_phone_clip_comes_out_upright(tmp_path: Path, frames: list[np.ndarray]):
    upright = frames[:10]
    sideways = [np.ascontiguousarray(np.rot90(f, 1)) for f in upright]  # as the sensor saw it
    make_video(tmp_path / "phone.mp4", sideways, rotation=90)  # displayed turned clockwise
    video = probe(tmp_path / "phone.mp4", "phone.mp4", 10**8)
    for index, image, original in FrameReader(video, range(10)):
        assert original == (180, 320)
        rgb = image[:, :, ::-1].astype(np.int16)
        right = np.abs(rgb - upright[index]).mean()  # encoding loss only
        assert right < 10 and np.abs(rgb - np.rot90(upright[index], 2)).mean() > 3 * right


def test_a_killed_run_resumes_per_frame_from_the_keyframe_before(
        tmp_path: Path, frames: list[np.ndarray], yolox_model: Path):
    folder = tmp_path / "in"
    folder.mkdir()
    make_video(folder / "long.mp4", frames, gop=30)
    out = tmp_path / "out"
    command = [sys.executable, "-m", "pretag.cli", "run", str(folder), "--output-dir",
               str(out), "--model", str(yolox_model), "--quiet", "--embeddings", "image",
               "--shard-images", "16"]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    root = out / ".lightly" / "predictions" / TASK
    deadline = time.monotonic() + 120
    while len(list(root.glob("long-*.json"))) < 100:
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    before = set(_predictions(out))
    assert 100 <= len(before) < 300

    assert _run(folder, out, yolox_model, "--embeddings", "image", "--shard-images", "16") == 0
    after = _predictions(out)
    assert sorted(after) == [f"long-{k:03d}-mp4.json" for k in range(300)]
    rows = [name for path in sorted(embeddings_dir(out).glob("images-*.parquet"))
            for name in pq.read_table(path)["filename"].to_pylist()]
    assert sorted(rows) == sorted(e["filename"] for e in after.values())  # each frame once

    # the reader seeks: frames 200.. cost at most one GOP of decoding before them
    video = probe(folder / "long.mp4", "long.mp4", 10**8)
    reader = FrameReader(video, range(200, 300))
    assert [index for index, _, _ in reader] == list(range(200, 300))
    assert reader.decoded <= 100 + 30


def _zero_frames(path: Path) -> Path:
    with av.open(str(path), "w") as container:
        stream: Any = container.add_stream("libx264", rate=30)
        stream.width, stream.height, stream.pix_fmt = 64, 64, "yuv420p"
        container.start_encoding()  # the header, and no frame
    return path


def _corrupt_packet(source: Path, target: Path, index: int) -> Path:
    """A copy whose packet ``index`` has a broken NAL length and garbage after it."""
    with av.open(str(source)) as container:
        packets = [(p.pos, p.size) for p in container.demux(container.streams.video[0])
                   if p.size]
    data = bytearray(source.read_bytes())
    pos, size = packets[index]
    data[pos:pos + size] = b"\xff" * size
    target.write_bytes(bytes(data))
    return target


def test_broken_videos_keep_what_was_read_and_end_in_errors(
        tmp_path: Path, frames: list[np.ndarray], yolox_model: Path):
    folder = tmp_path / "in"
    folder.mkdir()
    make_video(tmp_path / "good.mp4", frames[:120], gop=30)
    make_video(tmp_path / "fast.mp4", frames[:120], gop=30, faststart=True)
    (folder / "garbage.mp4").write_bytes(b"this is not a video" * 100)
    cut(tmp_path / "good.mp4", folder / "no_index.mp4", 0.5)  # index at the end: lost
    cut(tmp_path / "fast.mp4", folder / "half.mp4", 0.5)  # index first, data cut
    _corrupt_packet(tmp_path / "good.mp4", folder / "corrupt.mp4", 60)
    _zero_frames(folder / "empty.mp4")
    make_video(folder / "fine.mp4", frames[:20])
    out = tmp_path / "out"
    start = time.monotonic()
    assert _run(folder, out, yolox_model) == 3
    assert time.monotonic() - start < 120
    found = _predictions(out)
    errors = {(e["filename"], e["reason"].split(":")[0].split(" (")[0]): e
              for e in _errors(out)}
    assert set(errors) >= {("garbage.mp4", "not a readable video"),
                           ("no_index.mp4", "not a readable video"),
                           ("half.mp4", "cut short"),
                           ("corrupt.mp4", "decoding stopped")}
    assert all(e["code"] == "VIDEO" for e in errors.values())
    assert [e["reason"] for e in errors.values() if e["filename"] == "empty.mp4"] == \
        ["the file holds no video stream"]  # an mp4 track without samples is dropped
    corrupt = errors[("corrupt.mp4", "decoding stopped")]
    read = corrupt["frames_read"]
    assert 50 <= read <= 60 and corrupt["frames_left"] == 120 - read
    assert sorted(k for k in found if k.startswith("corrupt-")) == \
        [f"corrupt-{k:03d}-mp4.json" for k in range(read)]  # what came before is kept
    half = errors[("half.mp4", "cut short")]
    assert 0 < half["frames_read"] < 120
    assert 0 < len([k for k in found if k.startswith("half-")]) <= half["frames_read"]
    assert sorted(k for k in found if k.startswith("fine-")) == \
        [f"fine-{k:02d}-mp4.json" for k in range(20)]

    # the same run again: the same faults, nothing stored twice, still exit 3
    assert _run(folder, out, yolox_model) == 3
    assert _predictions(out) == found

    # sizes over --max-pixels: refused before a frame is decoded
    assert _run(folder, tmp_path / "small", yolox_model, "--max-pixels", "1000") == 3
    refused = [e for e in _errors(tmp_path / "small") if "over --max-pixels" in e["reason"]]
    assert {e["filename"] for e in refused} >= {"fine.mp4", "corrupt.mp4", "half.mp4"}


def test_a_decode_that_makes_no_progress_is_stopped(tmp_path: Path, frames: list[np.ndarray]):
    """A stream whose packets stop producing frames is stopped after a bound (here: B-frame
    delay against a bound of one packet)."""
    make_video(tmp_path / "a.mp4", frames[:30])
    video = probe(tmp_path / "a.mp4", "a.mp4", 10**8)
    with pytest.raises(VideoError, match="no frame decoded from 2 packets in a row"):
        list(FrameReader(video, range(30), stall_packets=1))
    assert len(list(FrameReader(video, range(30)))) == 30


def test_names_pad_to_the_frame_count():
    def named(count: int, index: int) -> str:
        return Video(Path("a/b.mov"), "a/b.mov", tuple(range(count)), Fraction(1, 30), 0, 8,
                     8).frame_name(index)

    assert named(100, 99) == "a/b-099-mov.png"  # Lightly's own example
    assert named(9, 3) == "a/b-3-mov.png"
    assert named(10, 3) == "a/b-03-mov.png"
    assert named(1000, 999) == "a/b-0999-mov.png"


def test_frames_are_samples_for_selection_crops_and_exports(
        tmp_path: Path, frames: list[np.ndarray], yolox_model: Path):
    """DIVERSITY over frames, the COCO and Lightly exports naming frames, object-level
    crops and the report's drawings read out of the video (--images is the input folder)."""
    folder = tmp_path / "in"
    (folder / "sub").mkdir(parents=True)
    make_video(folder / "sub" / "drive.mp4", frames[:90], gop=30)
    run = tmp_path / "run"
    assert _run(folder, run, yolox_model, "--embeddings", "all") == 0
    config = tmp_path / "diverse.json"
    config.write_text(json.dumps({"n_samples": 10, "strategies": [
        {"input": {"type": "EMBEDDINGS"}, "strategy": {"type": "DIVERSITY"}}]}))
    out = tmp_path / "picked"
    assert main(["select", str(run), "--config", str(config), "--output-dir", str(out),
                 "--images", str(folder), "--export", "coco", "--export", "lightly",
                 "--export", "yolo", "--export", "cvat", "--export", "label-studio"]) == 0
    picked = (out / "selection" / "selected.txt").read_text().split()
    for name in picked:  # the frames written out under their names, for the tools
        frame = cv2.imread(str(out / "selection" / "cvat" / "images" / name))
        assert frame is not None and frame.shape == (180, 320, 3)
        assert (out / "selection" / "yolo" / "images" / "train" /
                name.replace("/", "__")).is_file()
    tasks = json.loads((out / "selection" / "label_studio" / "tasks.json").read_text())
    assert [t["data"]["filename"] for t in tasks] == picked
    assert len(picked) == 10 and all(p.startswith("sub/drive-") and p.endswith("-mp4.png")
                                     for p in picked)
    coco = json.loads((out / "selection" / "coco.json").read_text())
    assert sorted(i["file_name"] for i in coco["images"]) == sorted(picked)
    assert {(i["width"], i["height"]) for i in coco["images"]} == {(320, 180)}
    lightly = out / "selection" / "lightly" / ".lightly" / "predictions" / TASK
    assert len(list(lightly.rglob("drive-*-mp4.json"))) == 10
    assert len(list((out / "report" / "selected").glob("*.jpg"))) == 6  # drawn from frames

    objects = tmp_path / "objects.json"
    objects.write_text(json.dumps({
        "worker_config": {"object_level": {"task_name": TASK}},
        "selection_config": {"n_samples": 5, "strategies": [
            {"input": {"type": "EMBEDDINGS"}, "strategy": {"type": "DIVERSITY"}}]}}))
    crops_out = tmp_path / "crops"
    assert main(["select", str(run), "--config", str(objects), "--output-dir", str(crops_out),
                 "--images", str(folder), "--write-crops"]) == 0
    crops = (crops_out / "selection" / "selected.txt").read_text().split()
    assert len(crops) == 5 and all(c.startswith("sub/drive-") and c.endswith("-png")
                                   for c in crops)
    for crop in crops:
        image = cv2.imread(str(crops_out / "selection" / "crops" / f"{crop}.png"))
        assert image is not None and image.size > 0


def test_sequence_selection_picks_windows_of_consecutive_frames(
        tmp_path: Path, frames: list[np.ndarray], yolox_model: Path,
        caplog: pytest.LogCaptureFixture):
    folder = tmp_path / "in"
    folder.mkdir()
    make_video(folder / "a.mp4", frames[:60], gop=30)
    make_video(folder / "b.mp4", frames[100:147], gop=30)  # 47 frames: a tail of 2 left out
    run = tmp_path / "run"
    assert _run(folder, run, yolox_model) == 0

    def config(n: int, length: int = 5) -> Path:
        path = tmp_path / f"seq{n}.json"
        path.write_text(json.dumps({
            "worker_config": {"selected_sequence_length": length},
            "selection_config": {"n_samples": n, "strategies": [
                {"input": {"type": "EMBEDDINGS"}, "strategy": {"type": "DIVERSITY"}}]}}))
        return path

    out = tmp_path / "picked"
    assert main(["select", str(run), "--config", str(config(20)), "--output-dir", str(out),
                 "--images", str(folder)]) == 0
    picked = (out / "selection" / "selected.txt").read_text().split()
    assert len(picked) == 20
    info = json.loads((out / "selection" / "sequence_information.json").read_text())
    assert len(info) == 4 and [f for w in info for f in w["frame_names"]] == picked
    for window in info:
        video = probe(folder / window["video_name"], window["video_name"], 10**8)
        start = window["frame_indices"][0]
        assert start % 5 == 0 and window["frame_indices"] == list(range(start, start + 5))
        assert window["frame_names"] == [video.frame_name(k) for k in window["frame_indices"]]
        assert window["frame_timestamps_pts"] == [video.pts[k] for k in
                                                  window["frame_indices"]]
        assert window["video_name"] != "b.mp4" or start < 45
    record = json.loads((out / "selection" / "selection.json").read_text())
    assert record["samples"] == 12 + 9 and all(len(p["frames"]) == 5 for p in record["picks"])

    assert main(["select", str(run), "--config", str(config(22)), "--output-dir", str(out),
                 "--images", str(folder)]) == 2
    assert "22 frames is not a multiple of worker_config.selected_sequence_length 5" \
        in caplog.text
    assert main(["select", str(run), "--config", str(config(20)), "--output-dir",
                 str(tmp_path / "x")]) == 2
    assert "needs --images" in caplog.text
