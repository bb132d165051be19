"""The input seam: where a job's items come from.

A :class:`Source` lists :class:`ImageItem`\\ s (a name, where to read it, its size when the
listing gave it) and the entries it cannot use (records for errors.jsonl). The job only
ever sees items, so a new kind of input is a new source in this module's :data:`SOURCES`
(tried in order, the first that claims the input wins), not edits across the job.

Sources here: a local folder (recursive), a local list file (one path a line), an
object-storage prefix (one listing call, which also gives every object's size, so the
job sends no stat per object) and an object-storage list file.
"""

from __future__ import annotations

import os
import posixpath
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Protocol

from upath import UPath

from pretag.job.errors import Code, record
from pretag.job.storage import AnyPath, StorageError, find_sized

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"})
# the Lightly Worker's (any case); job/video.py turns each into its frames
VIDEO_SUFFIXES = frozenset({".mp4", ".m4v", ".hevc", ".mpg", ".mpeg", ".avi", ".mov", ".webm"})
INPUT_SUFFIXES = IMAGE_SUFFIXES | VIDEO_SUFFIXES


class InputError(ValueError):
    """The INPUT argument names nothing usable."""


@dataclass(frozen=True)
class ImageItem:
    """One sample: an image file, or a frame of a video (``video`` set, see job/video.py)."""

    path: AnyPath  # where to read it
    name: str  # relative POSIX path: the "filename" written in its prediction
    size: int | None = None  # bytes, when the listing gave it (object storage)
    video: Any = None  # the pretag.job.video.Video it is a frame of (None: an image file)
    frame: int = -1  # its frame number in the video


@dataclass(frozen=True)
class Listing:
    """The images found, and the entries that look like images but cannot be read as files
    (records for errors.jsonl: a directory named x.jpg, a broken symbolic link, a FIFO)."""

    items: list[ImageItem]
    problems: list[dict[str, Any]]
    videos: int = 0  # video files whose frames are among the items


class Source(Protocol):
    """Lists a job's input."""

    def list(self) -> Listing: ...


def _not_a_file(path: Path, name: str, how: str = "has an image suffix") -> dict[str, Any]:
    what = ("a broken symbolic link" if path.is_symlink() and not path.exists()
            else "a directory" if path.is_dir()
            else "not a regular file (a FIFO, socket or device)")
    return record(path, name, Code.NOT_A_FILE, f"{how} but is {what}")


def list_name(line: str, list_dir: Path) -> str:
    """The name of an image listed in a list file (its "filename" and prediction path).

    An image inside the list file's folder is named by its path relative to that
    folder; any other by its absolute path without the leading "/". ".." and "."
    are resolved first, so a name never leaves the prediction folder:
    ``../images/a.jpg`` in ``/data/lists/todo.txt`` is named ``data/images/a.jpg``.
    """
    base = Path(os.path.normpath(list_dir.absolute()))
    full = Path(os.path.normpath(base / line))  # an absolute line replaces base
    try:
        return full.relative_to(base).as_posix()
    except ValueError:
        return PurePosixPath(*full.parts[1:]).as_posix()


def _lines(text: str) -> list[str]:
    return [line for line in (raw.strip() for raw in text.splitlines())
            if line and not line.startswith("#")]


@dataclass(frozen=True)
class FolderSource:
    """Images under a local folder, recursive, sorted, named relative to it."""

    root: Path

    def list(self) -> Listing:
        items, problems = [], []
        for p in sorted(self.root.rglob("*")):
            if p.suffix.lower() not in INPUT_SUFFIXES:
                continue
            name = p.relative_to(self.root).as_posix()
            if p.is_file():
                items.append(ImageItem(p, name))
            else:
                problems.append(_not_a_file(p, name))
        return Listing(items, problems)


@dataclass(frozen=True)
class ListFileSource:
    """A local text file naming one image a line (see :func:`list_name`)."""

    file: Path

    def list(self) -> Listing:
        items, problems = [], []
        for line in _lines(self.file.read_text()):
            path = Path(line)
            path = path if path.is_absolute() else self.file.parent / path
            name = list_name(line, self.file.parent)
            if path.exists() and not path.is_file():  # a FIFO would block its read forever
                problems.append(_not_a_file(path, name, "is listed as an image"))
            else:  # a missing file is a READ error when the job gets to it
                items.append(ImageItem(path, name))
        return Listing(items, problems)


@dataclass(frozen=True)
class PrefixSource:
    """Objects under a prefix: one listing, which gives names and sizes."""

    prefix: UPath

    def list(self) -> Listing:
        found = find_sized(self.prefix)
        items = [ImageItem(self.prefix / name, name, size) for name, size in sorted(found.items())
                 if PurePosixPath(name).suffix.lower() in INPUT_SUFFIXES]
        if not items and not self.prefix.fs.exists(self.prefix.path.rstrip("/")):
            raise InputError(f"input {self.prefix} does not exist")
        return Listing(items, [])


@dataclass(frozen=True)
class ListObjectSource:
    """A list file on object storage: relative lines are relative to its prefix."""

    file: UPath

    def list(self) -> Listing:
        base = posixpath.dirname(self.file.path.rstrip("/"))
        items = []
        for line in _lines(self.file.read_text()):
            full = posixpath.normpath(line.split("://", 1)[1] if "://" in line
                                      else posixpath.join(base, line))
            inside = full.startswith(base + "/")
            where = UPath(f"{self.file.protocol}://{full}", **self.file.storage_options)
            items.append(ImageItem(where, full[len(base) + 1:] if inside else full))
        return Listing(items, [])


def _local(path: AnyPath) -> Source | None:
    if not isinstance(path, Path):
        return None
    if path.is_dir():
        return FolderSource(path)
    if path.is_file():
        return ListFileSource(path)
    raise InputError(f"input {path} does not exist")


def _remote(path: AnyPath) -> Source | None:
    if isinstance(path, Path):
        return None
    try:
        is_file = path.fs.isfile(path.path.rstrip("/"))
    except PermissionError as exc:
        raise StorageError(f"cannot list {path}: access denied ({exc})") from None
    return ListObjectSource(path) if is_file else PrefixSource(path)


#: Each takes the INPUT and returns its source, or None when it is not that kind.
SOURCES: Sequence[Callable[[AnyPath], Source | None]] = (_local, _remote)


def open_source(path: AnyPath) -> Source:
    """The source for INPUT ``path``; InputError when nothing can read it."""
    for make in SOURCES:
        source = make(path)
        if source is not None:
            return source
    raise InputError(f"input {path} is neither a folder, a list file nor a prefix")


def list_images(path: AnyPath) -> Listing:
    """Images under a folder or prefix (recursive, sorted) or listed in a text file (one
    per line); see the sources above."""
    try:
        return open_source(path).list()
    except PermissionError as exc:
        raise StorageError(f"cannot list {path}: access denied ({exc})") from None
