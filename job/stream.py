"""Streaming a dataset to one or more servers, writing predictions as they arrive.

Reader tasks read files ahead in a thread pool, bounded by a memory budget of
images held at once. One worker per server pulls images from the shared queue
into its own DetectStream with at most ``window`` in flight, so faster servers
take more work. A worker whose server fails puts its in-flight images back for
the others and retries its server with backoff; images refused with an overload
or unavailable status go back to the queue. A stream that answers nothing for
``server_timeout_s`` while images are in flight (a frozen or hung server) is
cancelled and its images go to the others. Files too large for the servers'
message limit are reported before they are sent. A full disk stops the job at
once. Results are written atomically as they arrive, so a killed run is
finished by running it again.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from tqdm import tqdm

from pretag.client.api import AsyncClient, Image, Prediction, PretagError
from pretag.job.backoff import Backoff
from pretag.job.errors import Code
from pretag.job.health import content_hash
from pretag.job.outputs import make_entry, write_prediction
from pretag.job.sources import ImageItem
from pretag.job.storage import AnyPath, storage_outage
from pretag.job.vectors import Shard, VectorStore
from pretag.job.video import FrameReader, Video, VideoError, failure
from pretag.job.work import (  # re-exported: the job's callers import them from here
    STOP_WORK,
    Ask,
    Connect,
    JobState,
    NotAFile,
    RunError,
    StoreOutage,
    StreamClient,
    StreamSettings,
    Target,
    Work,
    file_size,
    read_units,
    write_failure,
)
from pretag.preprocess import Pixels

log = logging.getLogger(__name__)

_RESUME = "what was written is kept: run the same command again to resume"


def _read_hashed(path: AnyPath) -> tuple[bytes, str]:
    """The file's bytes and their content hash (exact duplicates), in the reading thread."""
    data = path.read_bytes()
    return data, content_hash(data)


# Bytes of a DetectRequest beside the image and its id (field tags, lengths, threshold).
_REQUEST_OVERHEAD = 64


class Job:
    """Streams ``todo`` to ``targets``; see the module docstring.

    ``connect`` opens a client for a target's connection (default :class:`AsyncClient`).
    """

    def __init__(self, targets: list[Target], todo: list[ImageItem], output_dir: AnyPath,
                 state: JobState, settings: StreamSettings, ask: Ask, progress: tqdm,
                 on_result: Callable[[str, bool], None] | None = None,
                 connect: Connect = AsyncClient, vectors: VectorStore | None = None) -> None:
        self.connect = connect
        self.ask = ask
        self.vectors = vectors
        self.targets = targets
        self.todo = todo
        self.output_dir = output_dir
        self.state = state
        self.settings = settings
        self.progress = progress
        self.on_result = on_result
        self.max_image_bytes = min(t.max_message_bytes for t in targets) - _REQUEST_OVERHEAD
        self.fatal: RunError | None = None
        self.pool = ThreadPoolExecutor(settings.read_threads + 2, thread_name_prefix="pretag-io")

    async def run(self) -> None:
        self.queue: asyncio.Queue[Any] = asyncio.Queue()
        self.memory = asyncio.Semaphore(sum(t.window for t in self.targets) * 2)
        self.done = asyncio.Event()
        if not self.todo:
            return
        units = iter(read_units(self.todo))
        tasks = [asyncio.ensure_future(self._read(units))
                 for _ in range(self.settings.read_threads)]
        workers = [asyncio.ensure_future(self._worker(t)) for t in self.targets]
        done_wait = asyncio.ensure_future(self.done.wait())
        all_workers = asyncio.ensure_future(asyncio.wait(workers))
        try:
            await asyncio.wait([done_wait, all_workers], return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in [*tasks, *workers, done_wait, all_workers]:
                task.cancel()
            await asyncio.gather(*tasks, *workers, return_exceptions=True)
            if not isinstance(self.fatal, StoreOutage):  # a dead store: nothing more to it
                await self._flush_vectors()
            self.pool.shutdown(wait=True)
        if self.fatal is not None:
            raise self.fatal
        if not self.done.is_set():
            left = len(self.todo) - self.state.finished
            raise RunError(f"no server answered for {self.settings.server_timeout_s:g} s; "
                           f"{left} images left unprocessed (run the same command again to "
                           f"resume)")

    async def _read(self, units: Iterator[list[ImageItem]]) -> None:
        """Read units in turn (an image, or the frames of one video) until none is left,
        or the store stops answering."""
        for unit in units:
            video = unit[0].video
            go_on = (await self._read_image(unit[0]) if video is None
                     else await self._read_frames(video, unit))
            if not go_on:
                return

    async def _read_image(self, item: ImageItem) -> bool:
        loop = asyncio.get_running_loop()
        await self.memory.acquire()
        try:
            size = item.size if item.size is not None else \
                await loop.run_in_executor(self.pool, file_size, item.path)
            if size + len(item.name.encode()) > self.max_image_bytes:
                self._finish(item, None, f"file is {size / 2**20:.1f} MiB, over the "
                             f"{self.max_image_bytes / 2**20:.1f} MiB a request may carry "
                             f"(the servers' --max-message-mb)", Code.TOO_LARGE)
                return True
            data, digest = await loop.run_in_executor(self.pool, _read_hashed, item.path)
        except NotAFile as exc:
            self._finish(item, None, str(exc), Code.NOT_A_FILE)
            return True
        except Exception as exc:
            return self._read_failed(item, exc)
        self.queue.put_nowait(Work(item, data, digest=digest))
        return True

    async def _read_frames(self, video: Video, frames: list[ImageItem]) -> bool:
        """Decode the frames of one video that are still to do, one at a time (each
        holds a memory slot until answered); a fault ends the video, not the job."""
        loop = asyncio.get_running_loop()
        left = {item.frame: item for item in frames}
        reader = iter(FrameReader(video, list(left), self.ask.resize))
        while left:
            await self.memory.acquire()
            try:
                got = await loop.run_in_executor(self.pool, next, reader, None)
            except VideoError as exc:
                self.memory.release()
                self._video_failed(video, left, exc)
                return True
            except Exception as exc:
                return self._read_failed(frames[0], exc)
            if got is None:
                self.memory.release()
                break
            index, image, original = got
            self.queue.put_nowait(Work(left.pop(index), Pixels(image, original)))
        return True

    def _video_failed(self, video: Video, left: dict[int, ImageItem], exc: VideoError) -> None:
        """One errors.jsonl line for the video; its frames not read are counted as done
        (without a line each) so the job can end; a re-run tries them again."""
        self.state.errors.append(failure(video, list(left), exc))
        self.progress.set_postfix(failed=len(self.state.errors), refresh=False)
        for item in left.values():
            self._count(item, False)

    def _read_failed(self, item: ImageItem, exc: Exception) -> bool:
        """A read that raised: the store is down (stop the job) or this file cannot be
        read (its error, and go on)."""
        problem = storage_outage(exc)
        if problem is not None:  # the store, not this image: every read would fail
            self._stop(StoreOutage(f"cannot read {item.path}: {problem}. Stopped with "
                                   f"{self.state.written} of {len(self.todo)} images "
                                   f"written; {_RESUME}"))
            return False
        if not isinstance(exc, OSError):
            raise exc
        self._finish(item, None, f"cannot read file: {exc.strerror or exc}", Code.READ)
        return True

    def _finish(self, item: ImageItem, entry: dict[str, Any] | None, error: str | None,
                code: str = "") -> None:
        self.state.record(item, entry, error, code)
        if entry is None:
            self.progress.set_postfix(failed=len(self.state.errors), refresh=False)
        self.memory.release()
        self._count(item, entry is not None, counted=True)

    def _count(self, item: ImageItem, ok: bool, counted: bool = False) -> None:
        """One item done (``counted``: already in the state's tally)."""
        if not counted:
            self.state.finished += 1
        self.progress.update(1)
        if self.on_result is not None:
            self.on_result(item.name, ok)
        if self.state.finished == len(self.todo):
            self.done.set()
            for _ in self.targets:
                self.queue.put_nowait(STOP_WORK)

    async def _worker(self, target: Target) -> None:
        """Keeps one stream to one server busy; reconnects with backoff on failure."""
        clock = asyncio.get_running_loop().time  # the loop's clock (a fake one in tests)
        backoff = Backoff(self.settings.backoff_first_s, self.settings.backoff_max_s, clock)
        address = target.connection.address
        async with self.connect(target.connection) as client:
            while not self.done.is_set():
                attempt = _Attempt(asyncio.Semaphore(target.window), clock)
                try:
                    error = await self._attempt(client, attempt, backoff, address)
                finally:
                    attempt.closed = True
                    self._requeue(attempt, error_text=f"stream to {address} lost")
                if attempt.stopped or self.done.is_set():
                    return
                if backoff.failing_for() > self.settings.server_timeout_s:
                    log.error("giving up on %s after %.0f s without progress", address,
                              backoff.failing_for())
                    return
                delay = backoff.fail()
                log.warning("%s; retrying in %.1f s", error, delay)
                await asyncio.sleep(delay)

    async def _attempt(self, client: StreamClient, attempt: _Attempt, backoff: Backoff,
                       address: str) -> str:
        """One stream, until it ends, fails or stalls; returns why it ended."""
        consume = asyncio.ensure_future(self._consume(client, attempt, backoff, address))
        watchdog = asyncio.ensure_future(attempt.stalled(self.settings.server_timeout_s))
        try:
            await asyncio.wait([consume, watchdog], return_when=asyncio.FIRST_COMPLETED)
        finally:
            watchdog.cancel()
            if not consume.done():
                consume.cancel()
            await asyncio.gather(consume, watchdog, return_exceptions=True)
        if consume.cancelled():  # the watchdog fired: failing since its last answer
            if backoff.failing_since is None or attempt.progress_at < backoff.failing_since:
                backoff.failing_since = attempt.progress_at
            return (f"{address} answered nothing for {self.settings.server_timeout_s:g} s "
                    f"with {len(attempt.inflight)} images in flight")
        return consume.result()

    async def _consume(self, client: StreamClient, attempt: _Attempt, backoff: Backoff,
                       address: str) -> str:
        try:
            async for pred in client.detect_stream(self._feed(attempt, backoff),
                                                   self.ask.threshold,
                                                   embeddings=self.ask.embeddings,
                                                   pixel_metadata=self.ask.pixel_metadata,
                                                   class_probabilities=(
                                                       self.ask.class_probabilities)):
                attempt.answered()
                work = attempt.inflight.pop(pred.id, None)
                if work is not None:
                    attempt.busy = True  # our own writes are not the server's silence
                    try:
                        await self._handle(work, pred, backoff)
                    finally:
                        attempt.busy = False
                        attempt.progress_at = attempt.clock()
            return f"{address} closed the stream"
        except PretagError as exc:
            return f"{address}: {exc}"

    def _requeue(self, attempt: _Attempt, error_text: str) -> None:
        """Images whose answers were lost with a stream: redo them elsewhere, counting
        an attempt, so that an image that keeps breaking streams ends in errors.jsonl."""
        for work in attempt.inflight.values():
            work.attempts += 1
            if work.attempts >= self.settings.max_attempts:
                self._finish(work.item, None, f"{error_text} {work.attempts} times", Code.STREAM)
            else:
                self.queue.put_nowait(work)
        attempt.inflight.clear()

    async def _feed(self, attempt: _Attempt, backoff: Backoff
                    ) -> AsyncIterator[tuple[str, Image]]:
        """Requests of one stream attempt, taken from the shared queue as slots free up.

        gRPC may leave this generator suspended when the call ends; an image it
        takes after that goes straight back to the queue, so none is lost.
        """
        while True:
            await attempt.slots.acquire()
            await asyncio.sleep(backoff.pause_left())
            work = await self.queue.get()
            if attempt.closed:
                self.queue.put_nowait(work)
                return
            if work is STOP_WORK:
                attempt.stopped = True
                return
            attempt.sent(work)
            yield work.item.name, work.data

    async def _flush_vectors(self) -> None:
        """Write the vectors of the images finished so far, whatever ended the job."""
        shard = self.vectors.take() if self.vectors is not None else None
        if shard is not None:
            await self._write_shard(shard)

    def _stop(self, fatal: RunError) -> None:
        """End the job now: every later image would fail the same way."""
        if self.fatal is None:
            self.fatal = fatal
            self.done.set()

    async def _handle(self, work: Work, pred: Prediction, backoff: Backoff) -> None:
        error = pred.error
        if error is None:
            backoff.ok()
            await self._store(work.item, pred, work.digest)
        elif error.retryable and work.attempts + 1 < self.settings.max_attempts:
            work.attempts += 1
            backoff.pause()  # this server is busy or going away: let the others take work
            self.queue.put_nowait(work)
        else:
            self._finish(work.item, None, str(error), error.code.name)

    async def _store(self, item: ImageItem, pred: Prediction, digest: str | None = None
                     ) -> None:
        """The prediction file (with the image's pixel metadata and content hash, when
        known: job.health), then the vectors: an image is done only when all of it
        is stored. A vector shard that cannot be written stops the job (it covers many
        images already counted; the re-run redoes them)."""
        loop = asyncio.get_running_loop()
        entry = make_entry(item.name, pred.boxes, pred.labels, pred.scores, pred.metadata,
                           digest, pred.class_probabilities)
        try:  # checked first: an answer without its vectors leaves no prediction behind
            if self.vectors is not None:
                self.vectors.check(item.name, pred)
            await loop.run_in_executor(self.pool, write_prediction, self.output_dir, entry)
        except ValueError as exc:  # the server left out the vectors asked for
            self._finish(item, None, str(exc), Code.VECTORS)
            return
        except Exception as exc:
            fatal, reason = write_failure(exc, self.output_dir)
            if not fatal:
                self._finish(item, None, reason, Code.WRITE)
                return
            down = storage_outage(exc) is not None
            hint = _RESUME if down else "free space and run the same command again to resume"
            self._stop((StoreOutage if down else RunError)(
                f"{reason}. Stopped with {self.state.written} of {len(self.todo)} images "
                f"written; {hint}"))
            return
        shard = None if self.vectors is None else self.vectors.add(item.name, pred)
        if shard is not None:  # before _finish: the last image's ends the job, and a
            await self._write_shard(shard)  # write not yet started would be cancelled
        self._finish(item, entry, None)

    async def _write_shard(self, shard: Shard) -> None:
        assert self.vectors is not None
        try:
            await asyncio.get_running_loop().run_in_executor(self.pool, self.vectors.write,
                                                             shard)
        except Exception as exc:
            problem = storage_outage(exc)
            if problem is None and not isinstance(exc, (OSError, ValueError)):
                raise
            self._stop((StoreOutage if problem else RunError)(
                f"cannot write vectors to {self.vectors.root}: {problem or exc}; {_RESUME}"))


@dataclass
class _Attempt:
    """One stream to one server: its window and the images it has in flight."""

    slots: asyncio.Semaphore
    clock: Callable[[], float] = time.monotonic
    inflight: dict[str, Work] = field(default_factory=dict)
    stopped: bool = False  # the feed met the end-of-work marker
    closed: bool = False  # the call is over
    busy: bool = False  # the job is storing an answer (storage calls are bounded apart)
    progress_at: float = -1.0  # last answer, or idle->busy (the clock's time)

    def __post_init__(self) -> None:
        self.progress_at = self.clock()

    def sent(self, work: Work) -> None:
        if not self.inflight:  # the silence that counts starts when work is outstanding
            self.progress_at = self.clock()
        self.inflight[work.item.name] = work

    def answered(self) -> None:
        self.slots.release()
        self.progress_at = self.clock()

    async def stalled(self, timeout_s: float) -> None:
        """Returns once images are in flight and nothing was answered for ``timeout_s``."""
        while True:
            silent = self.clock() - self.progress_at
            if self.inflight and not self.busy and silent > timeout_s:
                return
            await asyncio.sleep(max(0.05, min(1.0, timeout_s - silent if self.inflight
                                              else timeout_s / 4)))
