"""The streaming job's parts (:mod:`pretag.job.stream` runs them): its settings, what each
request asks for, the servers as targets, the work items and the job's state, the client
interface it needs, and how failed reads and writes are sorted."""

from __future__ import annotations

import errno
import logging
import stat
from collections.abc import AsyncIterable, AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from pretag.client.api import Connection, Image, Prediction
from pretag.contract import ResizeSpec
from pretag.job.errors import record
from pretag.job.health import Health
from pretag.job.sources import ImageItem
from pretag.job.stats import Histogram
from pretag.job.storage import AnyPath, storage_outage
from pretag.v1 import pretag_pb2 as pb

log = logging.getLogger("pretag.job.stream")

class RunError(RuntimeError):
    """The run cannot start or cannot go on (exit code 2); the message says what to do."""


class StoreOutage(RunError):
    """The run stopped because the object store does not answer: what is left to write on
    the way out (vectors, errors.jsonl, the lease) is not tried against it; a re-run redoes
    the images whose vectors were not stored and takes over the lease."""


# Out of room or read-only: every later write would fail too, so the job stops.
_DISK_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS})


@dataclass(frozen=True)
class StreamSettings:
    """How the job streams; one value for every server (:class:`RunConfig` nests it)."""

    window: int = 32  # images in flight per server (capped at each server's --max-queue)
    read_threads: int = 4
    max_attempts: int = 8  # tries per image: retryable refusals and lost streams
    server_timeout_s: float = 60.0  # a server failing, or silent with work, this long is dropped
    backoff_first_s: float = 0.25  # a failing server is retried after this, then twice as long
    backoff_max_s: float = 10.0


@dataclass(frozen=True)
class Ask:
    """What every request asks for: the score threshold and the vectors; and the model's
    resize, which video frames get before they are sent (as pixels)."""

    threshold: float
    embeddings: str = "none"  # none|image|objects|all
    resize: ResizeSpec | None = None  # None: frames go at full size
    pixel_metadata: bool = False  # ask each answer for the image's pixel metadata
    class_probabilities: bool = False  # and each detection's class distribution


@dataclass(frozen=True)
class Target:
    """One server as the job uses it."""

    connection: Connection
    window: int
    max_message_bytes: int  # largest request it takes

    @classmethod
    def of(cls, connection: Connection, info: pb.ModelInfoResponse, window: int) -> Target:
        """Window within the server's queue; message limit the smaller of both ends'."""
        limit = connection.max_message_mb * 1024 * 1024
        if info.max_message_bytes > 0:
            limit = min(limit, info.max_message_bytes)
        max_queue = info.batching.max_queue
        if 0 < max_queue < window:
            log.info("%s queues at most %d images: window %d -> %d", connection.address,
                     max_queue, window, max_queue)
            window = max_queue
        return cls(connection, window, limit)


@dataclass
class Work:
    item: ImageItem
    data: Image
    attempts: int = 0
    digest: str | None = None  # the file's content hash (job.health), for exact duplicates


STOP_WORK: Any = object()  # the end-of-work marker on the job's queue


@dataclass
class JobState:
    """What the job has done so far; shared by readers and workers (one event loop)."""

    hist: Histogram
    errors: list[dict[str, Any]] = field(default_factory=list)
    written: int = 0
    finished: int = 0
    health: Health = field(default_factory=Health)

    def record(self, item: ImageItem, entry: dict[str, Any] | None, error: str | None,
               code: str = "") -> None:
        """One image finished: its entry counted, or its error kept for errors.jsonl."""
        if entry is not None:
            self.hist.add(entry)
            self.health.add(entry)
            self.written += 1
        else:
            self.errors.append(record(item.path, item.name, code, error))
        self.finished += 1


class StreamClient(Protocol):
    """What the job needs of a connection: :class:`AsyncClient`, or a fake in tests."""

    async def __aenter__(self) -> StreamClient: ...

    async def __aexit__(self, *exc: object) -> None: ...

    def detect_stream(self, items: AsyncIterable[tuple[str, Image]],
                      score_threshold: float | None = None, *,
                      embeddings: str = "none",
                      pixel_metadata: bool = False,
                      class_probabilities: bool = False) -> AsyncIterator[Prediction]: ...


Connect = Callable[[Connection], StreamClient]


def read_units(items: list[ImageItem]) -> list[list[ImageItem]]:
    """What one reader reads at a time: an image, or the frames of one video (decoded in
    order by one reader)."""
    units: list[list[ImageItem]] = []
    for item in items:
        if item.video is not None and units and units[-1][0].video is item.video:
            units[-1].append(item)
        else:
            units.append([item])
    return units


def write_failure(exc: BaseException, output_dir: AnyPath) -> tuple[bool, str]:
    """Whether a failed prediction write must stop the job (out of room, read-only, or
    an object store that does not answer: every later write would fail too), and what to
    say of it. Anything else unexpected is raised again."""
    problem = storage_outage(exc)
    if problem is not None:
        return True, f"cannot write predictions to {output_dir}: {problem}"
    if not isinstance(exc, OSError):
        raise exc
    if exc.errno in _DISK_ERRNOS:
        return True, f"cannot write predictions to {output_dir}: {exc.strerror}"
    return False, f"cannot write prediction: {exc}"


class NotAFile(OSError):
    """A listed path that is not a regular file (a FIFO would block a read forever)."""


def file_size(path: AnyPath) -> int:
    info = path.stat()
    if isinstance(path, Path) and not stat.S_ISREG(info.st_mode):
        raise NotAFile(f"{path} is not a regular file")
    return int(info.st_size)
