"""Test and benchmark videos made from still images (the shared driving frames): a slow pan
across each image, so consecutive frames differ as a drive's do. Also the faults tests need:
a clip cut short, a corrupt packet, a rotated phone clip (the mp4 track matrix)."""

from __future__ import annotations

import struct
from collections.abc import Sequence
from fractions import Fraction
from pathlib import Path
from typing import Any

import cv2
import numpy as np


def pan_frames(images: Sequence[Path], frames: int, size: tuple[int, int]) -> list[np.ndarray]:
    """``frames`` RGB frames of (width, height) ``size``, panning across each image in turn."""
    width, height = size
    per = max(1, frames // max(1, len(images)))
    out: list[np.ndarray] = []
    for index in range(frames):
        source = images[min(index // per, len(images) - 1)]
        image = cv2.imread(str(source))
        if image is None:
            raise ValueError(f"cannot read {source}")
        scale = max(width * 1.25 / image.shape[1], height / image.shape[0])
        big = cv2.resize(image, (int(image.shape[1] * scale) + 1, int(image.shape[0] * scale) + 1))
        step = (big.shape[1] - width) * (index % per) // per
        out.append(np.ascontiguousarray(big[:height, step:step + width, ::-1]))
    return out


def make_video(path: Path, frames: Sequence[np.ndarray], *, codec: str = "libx264",
               fps: int = 30, gop: int = 30, rotation: int = 0,
               times_s: Sequence[float] | None = None, faststart: bool = False) -> Path:
    """Encode RGB ``frames`` with PyAV; ``times_s``: each frame's timestamp (variable frame
    rate); ``rotation``: an mp4 track matrix turning the picture that many degrees
    clockwise for display, as a phone writes for a clip filmed on its side; ``faststart``:
    the mp4 index first (as streaming services write), so a copy cut short still opens."""
    import av

    height, width = frames[0].shape[:2]
    options = {"movflags": "faststart"} if faststart else {}
    with av.open(str(path), "w", options=options) as container:
        stream: Any = container.add_stream(codec, rate=fps)
        stream.width, stream.height = width, height
        stream.pix_fmt = "yuv420p"
        stream.codec_context.gop_size = gop
        if codec == "libx264":
            stream.codec_context.options = {"preset": "veryfast"}
        time_base = Fraction(1, 1000) if times_s is not None else Fraction(1, fps)
        stream.codec_context.time_base = time_base
        for index, rgb in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
            frame.pts = (round(times_s[index] * 1000) if times_s is not None else index)
            frame.time_base = time_base
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    if rotation:
        set_rotation(path, rotation)
    return path


def set_rotation(path: Path, degrees: int) -> None:
    """Write the display rotation into the (first) mp4 track header's matrix."""
    cos, sin = {90: (0, 1), 180: (-1, 0), 270: (0, -1)}[degrees % 360]
    fixed = 1 << 16
    matrix = struct.pack(">9i", cos * fixed, sin * fixed, 0, -sin * fixed, cos * fixed, 0,
                         0, 0, 1 << 30)
    data = bytearray(path.read_bytes())
    at = data.find(b"tkhd")
    if at < 0:
        raise ValueError(f"{path} has no mp4 track header")
    version = data[at + 4]
    offset = at + 4 + 4 + (32 if version == 1 else 20) + 8 + 8
    data[offset:offset + 36] = matrix
    path.write_bytes(bytes(data))


def cut(path: Path, out: Path, fraction: float) -> Path:
    """The first ``fraction`` of the file's bytes, as a copy cut short would be."""
    data = path.read_bytes()
    out.write_bytes(data[:int(len(data) * fraction)])
    return out
