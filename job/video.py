"""Video files as frames, named as the Lightly Worker names them.

A source lists a video file like an image; :func:`expand` probes it (one pass over its
packets, no decoding: frame count and each frame's presentation timestamp) and turns it
into one item per frame kept (``--frame-stride``, ``--fps``), named
``<video name>-<frame number zero-padded to len(str(frame count))>-<video ext>.png``
(``a/drive.mp4`` frame 99 of 100..999: ``a/drive-099-mp4.png``). :class:`FrameReader`
decodes the frames a job still needs: it seeks to the keyframe before the first one, gives
frames in presentation order, upright (the track's display rotation applied), and stops at
the first fault with how many frames it read. Decoding is PyAV's (FFmpeg): see
docs/video.md for the measurement behind that choice.
"""

from __future__ import annotations

import logging
import math
import posixpath
import re
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, replace
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

from pretag.contract import ResizeSpec
from pretag.job.errors import Code, record
from pretag.job.sources import VIDEO_SUFFIXES, ImageItem, Listing
from pretag.job.storage import AnyPath, storage_outage
from pretag.preprocess import decode_bgr, image_size, resize_image

log = logging.getLogger(__name__)

#: Packets decoded in a row without a frame coming out before a decode counts as stuck.
STALL_PACKETS = 250
_PROBERS = 8  # videos probed at once (I/O bound on object storage)


class VideoError(RuntimeError):
    """A video cannot be read (further); ``frames_read`` frames were read before."""

    def __init__(self, reason: str, frames_read: int = 0) -> None:
        super().__init__(reason)
        self.frames_read = frames_read


@dataclass(frozen=True)
class FrameSettings:
    """Which frames of each video are predicted (names keep the original numbers)."""

    stride: int = 1  # every N-th frame
    fps: float | None = None  # about this many frames a second, by timestamp

    def problem(self) -> str | None:
        if self.stride < 1:
            return "--frame-stride must be at least 1"
        if self.fps is not None and not self.fps > 0:
            return "--fps must be more than 0"
        if self.fps is not None and self.stride != 1:
            return "--fps and --frame-stride are two ways to thin frames: give one"
        return None


@dataclass(frozen=True, eq=False)
class Video:
    """A probed video file (compared by identity: its timestamps can be long)."""

    path: AnyPath
    name: str  # relative POSIX path of the file, e.g. "a/drive.mp4"
    pts: tuple[int, ...]  # frame k's presentation timestamp, in presentation order
    time_base: Fraction
    declared: int  # frames the container says it holds (0: it does not say)
    width: int
    height: int
    cut: str = ""  # why the packets ended before the frames declared ("": they did not)

    @property
    def frames(self) -> int:
        """Frames named: what the container declares, else what its packets hold."""
        return max(self.declared, len(self.pts))

    def frame_name(self, index: int) -> str:
        stem, ext = posixpath.splitext(self.name)
        return f"{stem}-{index:0{len(str(self.frames))}d}-{ext[1:]}.png"

    def seconds(self, index: int) -> float:
        return float((self.pts[index] - self.pts[0]) * self.time_base)


def is_video(name: str) -> bool:
    return posixpath.splitext(name)[1].lower() in VIDEO_SUFFIXES


@contextmanager
def _open(path: AnyPath) -> Iterator[Any]:
    """The container; on object storage over an fsspec file, closed with it."""
    import av

    if isinstance(path, Path):
        with av.open(str(path)) as container:
            yield container
        return
    with path.open("rb") as file, av.open(file) as container:
        yield container


def _unreadable(exc: OSError, frames_read: int = 0) -> VideoError:
    """This file cannot be read; a store that does not answer is raised as it is (the job
    stops for it, as for an image)."""
    if storage_outage(exc) is not None:
        raise exc
    return VideoError(f"cannot read file: {exc.strerror or exc}", frames_read)


def probe(path: AnyPath, name: str, max_pixels: int) -> Video:
    """Frame count and timestamps from one pass over the packets (no decoding); sizes
    over ``max_pixels`` are refused here, before any frame is decoded. A file whose packets
    end early (cut short) keeps those read: :attr:`Video.cut` says why. VideoError."""
    import av

    try:
        with _open(path) as container:
            if not container.streams.video:
                raise VideoError("the file holds no video stream")
            stream = container.streams.video[0]
            width, height = stream.codec_context.width, stream.codec_context.height
            if width * height > max_pixels:
                raise VideoError(f"frames are {width}x{height} = {width * height:,} pixels, "
                                 f"over --max-pixels {max_pixels:,}")
            pts, cut = _timestamps(container, stream)
            declared = stream.frames
            time_base = stream.time_base or Fraction(1, 1)
    except av.FFmpegError as exc:
        raise VideoError(f"not a readable video ({exc})") from None
    except OSError as exc:
        raise _unreadable(exc) from None
    if not pts:
        raise VideoError("the video holds no frames" + (f" that can be read ({cut})"
                                                        if cut else ""))
    if declared > len(pts) and not cut:
        cut = "its packets end early"
    return Video(path, name, tuple(sorted(pts)), time_base, declared, width, height, cut)


def _timestamps(container: Any, stream: Any) -> tuple[list[int], str]:
    """Every packet's presentation timestamp (decode order), and why reading them stopped
    early ("" when it did not)."""
    import av

    pts: list[int] = []
    try:
        for packet in container.demux(stream):
            if packet.size and packet.pts is not None:
                pts.append(packet.pts)
    except av.FFmpegError as exc:
        return pts, str(exc)
    return pts, ""


def kept(video: Video, settings: FrameSettings) -> list[int]:
    """The frame numbers ``settings`` keep."""
    count = len(video.pts)
    if settings.fps is None:
        return list(range(0, count, settings.stride))
    out, point = [], 0  # the first frame at or after each point n / fps is kept
    for index in range(count):
        seconds = video.seconds(index) + 1e-6
        if seconds >= point / settings.fps:
            out.append(index)
            point = math.floor(seconds * settings.fps) + 1
    return out


def expand(listing: Listing, settings: FrameSettings, max_pixels: int) -> Listing:
    """``listing`` with each video file replaced by its frames; a video that cannot be read
    becomes a record for errors.jsonl (code VIDEO)."""
    videos = [item for item in listing.items if is_video(item.name)]
    if not videos:
        return listing

    def one(item: ImageItem) -> Video | VideoError:
        try:
            return probe(item.path, item.name, max_pixels)
        except VideoError as exc:
            return exc

    with ThreadPoolExecutor(_PROBERS, thread_name_prefix="pretag-probe") as pool:
        probed = dict(zip((i.name for i in videos), pool.map(one, videos), strict=True))
    items, problems = [], list(listing.problems)
    for item in listing.items:
        found = probed.get(item.name)
        if found is None:
            items.append(item)
        elif isinstance(found, VideoError):
            problems.append(record(item.path, item.name, Code.VIDEO, str(found)))
        else:
            items.extend(ImageItem(item.path, found.frame_name(k), video=found, frame=k)
                         for k in kept(found, settings))
            if found.cut:
                problems.append(record(
                    item.path, item.name, Code.VIDEO,
                    f"cut short: {len(found.pts)} of the {found.frames} frames it declares "
                    f"can be read ({found.cut})", frames_read=len(found.pts),
                    frames_left=found.frames - len(found.pts)))
    read = sum(1 for v in probed.values() if isinstance(v, Video))
    return replace(listing, items=items, problems=problems, videos=read)


def failure(video: Video, left: Sequence[int], exc: VideoError) -> dict[str, Any]:
    """The errors.jsonl line of a video whose frames ``left`` could not be read."""
    return record(video.path, video.name, Code.VIDEO,
                  f"{exc} (at frame {min(left)}); {exc.frames_read} frames read, "
                  f"{len(left)} not", frames_read=exc.frames_read, frames_left=len(left))


def to_row(video: Video) -> dict[str, Any]:
    """The video as plain values (a Ray row), for :func:`from_row` on a worker."""
    return {"path": str(video.path), "video": video.name, "pts": list(video.pts),
            "time_base": str(video.time_base), "declared": video.declared,
            "width": video.width, "height": video.height}


def from_row(row: dict[str, Any], path: AnyPath) -> Video:
    return Video(path, str(row["video"]), tuple(int(p) for p in row["pts"]),
                 Fraction(str(row["time_base"])), int(row["declared"]), int(row["width"]),
                 int(row["height"]))


def upright(image: np.ndarray, rotation: float) -> np.ndarray:
    """Turn a decoded frame by its display rotation (degrees counterclockwise)."""
    turns = round(rotation / 90) % 4
    return np.ascontiguousarray(np.rot90(image, turns)) if turns else image


class FrameReader:
    """The frames ``wanted`` of one video, in presentation order, as BGR arrays resized for
    the model (``resize``; None: full size) with the original (height, width). Iterating
    raises :class:`VideoError` at the first fault, after the frames read before it."""

    def __init__(self, video: Video, wanted: Sequence[int], resize: ResizeSpec | None = None,
                 stall_packets: int = STALL_PACKETS) -> None:
        self.video = video
        self.wanted = sorted(set(wanted))
        self.resize = resize
        self.stall_packets = stall_packets
        self.decoded = 0  # frames decoded, kept or not (what a seek saves shows here)
        self.read = 0  # wanted frames given out

    def __iter__(self) -> Iterator[tuple[int, np.ndarray, tuple[int, int]]]:
        import av

        if not self.wanted:
            return
        index_of = {pts: k for k, pts in enumerate(self.video.pts)}
        todo = set(self.wanted)
        try:
            with _open(self.video.path) as container:
                stream = container.streams.video[0]
                first = self.wanted[0]
                if first > 0:  # the keyframe at or before the first frame wanted
                    container.seek(self.video.pts[first], stream=stream, backward=True)
                for frame, index in self._frames(container, stream, index_of):
                    if index not in todo:
                        continue
                    todo.discard(index)
                    yield index, *self._pixels(frame)
                    self.read += 1
                    if not todo:
                        return
        except av.FFmpegError as exc:
            raise VideoError(f"decoding stopped: {exc}", self.read) from None
        except OSError as exc:
            raise _unreadable(exc, self.read) from None
        if todo:
            raise VideoError(f"the video ended before frame {min(todo)}", self.read)

    def _frames(self, container: Any, stream: Any, index_of: dict[int, int]
                ) -> Iterator[tuple[Any, int]]:
        stuck = 0
        for packet in container.demux(stream):
            frames = packet.decode()
            stuck = 0 if frames else stuck + 1
            if stuck > self.stall_packets:
                raise VideoError(f"no frame decoded from {stuck} packets in a row", self.read)
            for frame in frames:
                self.decoded += 1
                index = index_of.get(frame.pts) if frame.pts is not None else None
                if index is not None:
                    yield frame, index

    def _pixels(self, frame: Any) -> tuple[np.ndarray, tuple[int, int]]:
        image = upright(frame.to_ndarray(format="bgr24"), frame.rotation)
        original = (image.shape[0], image.shape[1])
        return (image if self.resize is None else resize_image(image, self.resize)), original


def read_frame(video: Video, index: int) -> np.ndarray:
    """One frame, full size, BGR (debug images, crops). VideoError."""
    for _, image, _ in FrameReader(video, [index]):
        return image
    raise VideoError(f"frame {index} was not found")


#: A frame's name: ``<video stem>-<frame number>-<video ext>.png``.
_FRAME_NAME = re.compile(r"^(?P<stem>.+)-(?P<frame>\d+)-(?P<ext>[^-/.]+)\.png$")


def frame_source(name: str) -> tuple[str, int] | None:
    """The video and frame number a frame name stands for (``a/drive-099-mp4.png``:
    ``("a/drive.mp4", 99)``), or None when the name is not a frame's."""
    match = _FRAME_NAME.match(name)
    if match is None:
        return None
    return f"{match['stem']}.{match['ext']}", int(match["frame"])


class SampleImages:
    """The samples of a run's input folder by name: image files, and frames read out of
    the videos beside them (each video probed once). For crops, exports and drawings."""

    def __init__(self, root: Path, max_pixels: int = 10**9) -> None:
        self.root = root
        self.max_pixels = max_pixels
        self._videos: dict[str, Video] = {}

    def _frame(self, name: str) -> tuple[Video, int] | None:
        source = frame_source(name)
        if (self.root / name).is_file() or source is None:
            return None
        video_name, index = source
        if not (self.root / video_name).is_file():
            return None
        if video_name not in self._videos:
            self._videos[video_name] = probe(self.root / video_name, video_name,
                                             self.max_pixels)
        return self._videos[video_name], index

    def exists(self, name: str) -> bool:
        if (self.root / name).is_file():
            return True
        source = frame_source(name)
        return source is not None and (self.root / source[0]).is_file()

    def read_bgr(self, name: str) -> np.ndarray:
        """The sample's pixels, BGR; OSError, ImageError or VideoError."""
        frame = self._frame(name)
        if frame is None:
            return decode_bgr((self.root / name).read_bytes())
        return read_frame(*frame)

    def size(self, name: str) -> tuple[int, int]:
        """(width, height) as the sample is predicted (a frame: upright)."""
        frame = self._frame(name)
        if frame is None:
            return image_size((self.root / name).read_bytes())
        image = read_frame(*frame)
        return image.shape[1], image.shape[0]
