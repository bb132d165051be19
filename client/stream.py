"""Streaming a dataset to one or more servers, writing predictions as they arrive.

Reader tasks read files ahead in a thread pool, bounded by a memory budget of
images held at once. One worker per server pulls images from the shared queue
into its own DetectStream with at most ``window`` in flight, so faster servers
take more work. A worker whose server fails puts its in-flight images back for
the others and retries its server with backoff; images refused with an overload
or unavailable status go back to the queue. Results are written atomically as
they arrive, so a killed run is finished by running it again.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from pretag.client.api import AsyncClient, Connection, Prediction, PretagError
from pretag.client.outputs import ImageItem, make_entry, write_prediction
from pretag.client.report import Histogram
from pretag.v1 import pretag_pb2 as pb

log = logging.getLogger(__name__)


class RunError(RuntimeError):
    """The run cannot start or cannot go on (exit code 2); the message says what to do."""


@dataclass
class Work:
    item: ImageItem
    data: bytes
    attempts: int = 0


_STOP: Any = object()


@dataclass
class JobState:
    """What the job has done so far; shared by readers and workers (one event loop)."""

    hist: Histogram
    errors: list[dict[str, Any]] = field(default_factory=list)
    written: int = 0
    finished: int = 0


class Job:
    """Streams ``todo`` to ``connections``; see the module docstring."""

    def __init__(self, connections: list[Connection], todo: list[ImageItem], output_dir: Path,
                 state: JobState, *, threshold: float, window: int, read_threads: int,
                 max_attempts: int, server_timeout_s: float, progress: tqdm,
                 on_result: Callable[[str, bool], None] | None = None) -> None:
        self.connections = connections
        self.todo = todo
        self.output_dir = output_dir
        self.state = state
        self.threshold = threshold
        self.window = window
        self.read_threads = read_threads
        self.max_attempts = max_attempts
        self.server_timeout_s = server_timeout_s
        self.progress = progress
        self.on_result = on_result
        self.pool = ThreadPoolExecutor(read_threads + 2, thread_name_prefix="pretag-io")

    async def run(self) -> None:
        self.queue: asyncio.Queue[Any] = asyncio.Queue()
        self.memory = asyncio.Semaphore(self.window * len(self.connections) * 2)
        self.done = asyncio.Event()
        if not self.todo:
            return
        items = iter(self.todo)
        tasks = [asyncio.ensure_future(self._read(items)) for _ in range(self.read_threads)]
        workers = [asyncio.ensure_future(self._worker(c)) for c in self.connections]
        done_wait = asyncio.ensure_future(self.done.wait())
        all_workers = asyncio.ensure_future(asyncio.wait(workers))
        try:
            await asyncio.wait([done_wait, all_workers], return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in [*tasks, *workers, done_wait, all_workers]:
                task.cancel()
            await asyncio.gather(*tasks, *workers, return_exceptions=True)
            self.pool.shutdown(wait=True)
        if not self.done.is_set():
            left = len(self.todo) - self.state.finished
            raise RunError(f"no server answered for {self.server_timeout_s:g} s; {left} images "
                           f"left unprocessed (run the same command again to resume)")

    async def _read(self, items: Iterator[ImageItem]) -> None:
        loop = asyncio.get_running_loop()
        for item in items:
            await self.memory.acquire()
            try:
                data = await loop.run_in_executor(self.pool, item.path.read_bytes)
            except OSError as exc:
                self._finish(item, None, f"cannot read file: {exc.strerror or exc}")
                continue
            self.queue.put_nowait(Work(item, data))

    def _finish(self, item: ImageItem, entry: dict[str, Any] | None, error: str | None,
                code: str = "") -> None:
        if entry is not None:
            self.state.hist.add(entry)
            self.state.written += 1
        else:
            self.state.errors.append({"path": str(item.path), "filename": item.name,
                                      "code": code, "reason": error})
            self.progress.set_postfix(failed=len(self.state.errors), refresh=False)
        self.state.finished += 1
        self.memory.release()
        self.progress.update(1)
        if self.on_result is not None:
            self.on_result(item.name, entry is not None)
        if self.state.finished == len(self.todo):
            self.done.set()
            for _ in self.connections:
                self.queue.put_nowait(_STOP)

    async def _worker(self, connection: Connection) -> None:
        """Keeps one stream to one server busy; reconnects with backoff on failure."""
        backoff = _Backoff()
        async with AsyncClient(connection) as client:
            while not self.done.is_set():
                attempt = _Attempt(asyncio.Semaphore(self.window))
                try:
                    async for pred in client.detect_stream(self._feed(attempt, backoff),
                                                           self.threshold):
                        attempt.slots.release()
                        work = attempt.inflight.pop(pred.id, None)
                        if work is not None:
                            await self._handle(work, pred, backoff)
                    error = f"{connection.address} closed the stream"
                except PretagError as exc:
                    error = f"{connection.address}: {exc}"
                finally:
                    attempt.closed = True
                    for work in attempt.inflight.values():  # answers lost: redo elsewhere
                        self.queue.put_nowait(work)
                    attempt.inflight.clear()
                if attempt.stopped:
                    return
                if backoff.failing_for() > self.server_timeout_s:
                    log.error("giving up on %s after %.0f s of failures", connection.address,
                              backoff.failing_for())
                    return
                delay = backoff.fail()
                log.warning("%s; retrying in %.1f s", error, delay)
                await asyncio.sleep(delay)

    async def _feed(self, attempt: _Attempt, backoff: _Backoff
                    ) -> AsyncIterator[tuple[str, bytes]]:
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
            if work is _STOP:
                attempt.stopped = True
                return
            attempt.inflight[work.item.name] = work
            yield work.item.name, work.data

    async def _handle(self, work: Work, pred: Prediction, backoff: _Backoff) -> None:
        error = pred.error
        if error is None:
            backoff.ok()
            entry = make_entry(work.item.name, pred.boxes, pred.labels, pred.scores)
            try:
                await asyncio.get_running_loop().run_in_executor(
                    self.pool, write_prediction, self.output_dir, entry)
            except OSError as exc:
                self._finish(work.item, None, f"cannot write prediction: {exc}", "WRITE")
                return
            self._finish(work.item, entry, None)
        elif error.retryable and work.attempts + 1 < self.max_attempts:
            work.attempts += 1
            backoff.pause()  # this server is busy or going away: let the others take work
            self.queue.put_nowait(work)
        else:
            self._finish(work.item, None, str(error), error.code.name)


@dataclass
class _Attempt:
    """One stream to one server: its window and the images it has in flight."""

    slots: asyncio.Semaphore
    inflight: dict[str, Work] = field(default_factory=dict)
    stopped: bool = False  # the feed met the end-of-work marker
    closed: bool = False  # the call is over


class _Backoff:
    """Exponential backoff state of one worker."""

    def __init__(self, first_s: float = 0.25, max_s: float = 10.0) -> None:
        self.first_s, self.max_s = first_s, max_s
        self.delay = first_s
        self.failing_since: float | None = None
        self.paused_until = 0.0

    def ok(self) -> None:
        self.delay, self.failing_since = self.first_s, None

    def fail(self) -> float:
        if self.failing_since is None:
            self.failing_since = time.monotonic()
        delay, self.delay = self.delay, min(self.delay * 2, self.max_s)
        return delay

    def pause(self) -> None:
        self.paused_until = time.monotonic() + self.fail()

    def pause_left(self) -> float:
        return max(0.0, self.paused_until - time.monotonic())

    def failing_for(self) -> float:
        return 0.0 if self.failing_since is None else time.monotonic() - self.failing_since


async def check_servers(connections: list[Connection], timeout_s: float
                        ) -> pb.ModelInfoResponse:
    """The first server's model info; RunError if one cannot be reached or classes differ."""
    async def info(connection: Connection) -> pb.ModelInfoResponse:
        async with AsyncClient(connection) as client:
            try:
                return await client.model_info(timeout=timeout_s)
            except PretagError as exc:
                raise RunError(f"server {connection.address} is unreachable: "
                               f"{str(exc).splitlines()[0]}") from None

    infos = await asyncio.gather(*(info(c) for c in connections))
    names = {tuple(i.class_names) for i in infos}
    if len(names) > 1:
        raise RunError(f"servers disagree on class names: {sorted(names)}")
    models = {(i.name, i.source_sha256, i.precision) for i in infos}
    if len(models) > 1:
        log.warning("servers run different models (name, weights sha256, precision): %s",
                    sorted(models))
    return infos[0]


def write_errors(path: Path, errors: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for record in errors:
            f.write(json.dumps(record) + "\n")

