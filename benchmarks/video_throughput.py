"""Video throughput (issue 21): `pretag run` on a 1080p H.264 video against an in-process
loop (decode + model), with decode alone (PyAV and OpenCV, one thread and FFmpeg's own
threading) and the model alone beside it. Frames/s; every figure from this one sitting, each
timed ``--repeats`` times alternating (the best kept), so ratios are what to compare.

    python benchmarks/video_throughput.py --model MODEL.onnx [--frames 300] [--output J]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from pretag.bench.stats import git_commit, machine
from pretag.bench.video import make_video, pan_frames
from pretag.job.run import RunConfig
from pretag.job.video import FrameReader, probe
from pretag.local import run_locally
from pretag.preprocess import pad_batch
from pretag.runtime.backend import OrtBackend
from pretag.runtime.detections import split_outputs

log = logging.getLogger("video_throughput")


def decode_pyav(path: Path, threads: str) -> int:
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        if threads == "one":
            stream.codec_context.thread_count = 1
        else:
            stream.thread_type = "AUTO"
        return sum(1 for frame in container.decode(stream)
                   if frame.to_ndarray(format="bgr24") is not None)


def decode_opencv(path: Path, threads: str) -> int:
    params = [cv2.CAP_PROP_N_THREADS, 1] if threads == "one" else []
    capture = cv2.VideoCapture(str(path), cv2.CAP_FFMPEG, params)
    count = 0
    while capture.read()[0]:
        count += 1
    capture.release()
    return count


def in_process(path: Path, backend: OrtBackend, batch_size: int) -> int:
    """The loop `pretag run` is held to: decode, resize, model, detections; no gRPC."""
    video = probe(path, path.name, 10**9)
    spec = backend.spec.resize
    pending: list[np.ndarray] = []
    count = 0
    for _, image, _ in FrameReader(video, range(video.frames), spec):
        pending.append(image)
        if len(pending) == batch_size:
            count += _detect(backend, pending)
            pending = []
    return count + (_detect(backend, pending) if pending else 0)


def _detect(backend: OrtBackend, images: list[np.ndarray]) -> int:
    batch = pad_batch(images, backend.spec.resize, bgr=True)
    return len(split_outputs(backend.run(batch), [i.shape[:2] for i in images]))


def model_alone(path: Path, backend: OrtBackend, batch_size: int) -> Callable[[], int]:
    """The model on the video's frames, decoded and resized beforehand."""
    video = probe(path, path.name, 10**9)
    frames = [image for _, image, _ in FrameReader(video, range(min(64, video.frames)),
                                                   backend.spec.resize)]

    def run() -> int:
        for start in range(0, len(frames), batch_size):
            _detect(backend, frames[start:start + batch_size])
        return len(frames)

    return run


def pretag_run(folder: Path, model: Path, work: Path, job_time: bool) -> Callable[[], Any]:
    """`pretag run` with its local server: timed by the run's own clock (listing, resume
    check and streaming, as its summary reports it), or including the server's start and
    warm-up (wall)."""
    def run() -> Any:
        out = Path(tempfile.mkdtemp(dir=work))
        summary = run_locally(RunConfig(folder, out, quiet=True), model)
        if summary.failed:
            raise RuntimeError(f"{summary.failed} frames failed")
        return (summary.written, summary.seconds) if job_time else summary.written

    return run


def timed(run: Callable[[], Any]) -> float:
    start = time.perf_counter()
    got = run()
    count, seconds = got if isinstance(got, tuple) else (got, time.perf_counter() - start)
    return count / seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--frames", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    shared = Path(os.environ.get("PRETAG_SHARED", Path(__file__).resolve().parents[2] / "shared"))
    work = Path(tempfile.mkdtemp(prefix="pretag-video-"))
    folder = work / "in"
    folder.mkdir()
    video = folder / "drive.mp4"
    images = sorted((shared / "data" / "driving").iterdir())
    make_video(video, pan_frames(images, args.frames, (1920, 1080)), gop=30)
    log.info("made %s: %d frames 1920x1080 H.264, %.1f MB", video, args.frames,
             video.stat().st_size / 1e6)
    backend = OrtBackend(args.model)
    cases: dict[str, Callable[[], Any]] = {
        "decode PyAV, 1 thread": lambda: decode_pyav(video, "one"),
        "decode OpenCV, 1 thread": lambda: decode_opencv(video, "one"),
        "decode PyAV, FFmpeg threads": lambda: decode_pyav(video, "auto"),
        "decode OpenCV, FFmpeg threads": lambda: decode_opencv(video, "auto"),
        "model alone (resized frames)": model_alone(video, backend, args.batch_size),
        "in-process loop (decode + model)": lambda: in_process(video, backend,
                                                                args.batch_size),
        "pretag run (gRPC, local server), job time": pretag_run(folder, args.model, work,
                                                                 True),
        "pretag run, wall incl. server start": pretag_run(folder, args.model, work, False),
    }
    best: dict[str, float] = {}
    for repeat in range(args.repeats):
        for name, run in cases.items():
            rate = timed(run)
            best[name] = max(best.get(name, 0.0), rate)
            log.info("%d %-44s %7.1f frames/s", repeat, name, rate)
    loop = best["in-process loop (decode + model)"]
    rows = [{"case": name, "frames_per_s": round(rate, 1),
             "vs_in_process_loop": round(rate / loop, 3)} for name, rate in best.items()]
    result: dict[str, Any] = {"commit": git_commit(), "machine": machine(),
                              "model": args.model.name, "frames": args.frames,
                              "size": "1920x1080", "batch_size": args.batch_size,
                              "repeats": args.repeats, "rows": rows}
    print("| case | frames/s | vs in-process loop |\n|---|---:|---:|")
    for row in rows:
        print(f"| {row['case']} | {row['frames_per_s']} | {row['vs_in_process_loop']}x |")
    if args.output:
        args.output.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
