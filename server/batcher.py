"""A dynamic batcher: one small asyncio component.

Callers ``await batcher.submit(item, key)``. Items wait in per-key groups (the
key is the padded input shape, so one large image does not pad a whole batch).
Whenever a model instance is free, the dispatcher takes the group whose oldest
item has waited longest, waits at most ``max_delay_s`` from that item's arrival
for the group to fill up to ``max_batch_size``, and runs the batch. Under load
the delay has already passed, so batches form from whatever is waiting.

Items whose caller cancelled are dropped before compute; items whose deadline
passed get :class:`DeadlineExceeded`. A failing batch fans its exception out to
every caller in it. With ``max_queue`` the queue is bounded: a full queue raises
:class:`QueueFull` (the server's engine admits work itself and sets no bound here).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from pretag.runtime.detections import BatchInfo
from pretag.server.errors import DeadlineExceeded, QueueFull, Unavailable

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")

RunBatch = Callable[[Sequence[T]], Awaitable[Sequence[R]]]


def _now() -> float:
    """The event loop's clock: time.monotonic() in production, a fake one in tests."""
    return asyncio.get_running_loop().time()


@dataclass
class _Pending(Generic[T, R]):
    item: T
    future: asyncio.Future[tuple[R, BatchInfo]]
    enqueued: float
    deadline: float | None = None
    started: float = field(default=0.0)


class DynamicBatcher(Generic[T, R]):
    """Groups concurrent submissions into batches for ``run_batch``.

    ``run_batch`` gets a non-empty sequence of items and must return one result
    per item, in order. Up to ``instances`` batches run at the same time.
    """

    def __init__(self, run_batch: RunBatch[T, R], *, max_batch_size: int, max_delay_s: float,
                 max_queue: int | None = None, instances: int = 1,
                 on_batch: Callable[[BatchInfo], None] | None = None) -> None:
        if (max_batch_size < 1 or instances < 1 or max_delay_s < 0
                or (max_queue is not None and max_queue < 1)):
            raise ValueError("max_batch_size, max_queue and instances must be >= 1, "
                             "max_delay_s >= 0")
        self._run_batch = run_batch
        self.max_batch_size = max_batch_size
        self.max_delay_s = max_delay_s
        self.max_queue = max_queue
        self.instances = instances
        self._on_batch = on_batch
        self._groups: OrderedDict[Hashable, deque[_Pending[T, R]]] = OrderedDict()
        self._queued = 0
        self._arrival = asyncio.Event()
        self._slots = asyncio.Semaphore(instances)
        self._running: set[asyncio.Task[None]] = set()
        self._dispatcher: asyncio.Task[None] | None = None
        self._closed = False

    @property
    def queued(self) -> int:
        """Items waiting for a batch (not yet handed to the model)."""
        return self._queued

    @property
    def in_flight(self) -> int:
        """Batches being computed right now."""
        return len(self._running)

    def start(self) -> None:
        if self._dispatcher is None:
            self._dispatcher = asyncio.get_running_loop().create_task(self._dispatch())

    async def submit(self, item: T, key: Hashable = None,
                     deadline: float | None = None) -> tuple[R, BatchInfo]:
        """Queue ``item`` and wait for its result.

        ``deadline`` is an absolute time on the event loop's clock (``loop.time()``), or None.
        """
        if self._closed:
            raise Unavailable("server is shutting down")
        if self.max_queue is not None and self._queued >= self.max_queue:
            raise QueueFull(f"queue is full ({self.max_queue} waiting); retry later")
        self.start()
        future: asyncio.Future[tuple[R, BatchInfo]] = asyncio.get_running_loop().create_future()
        self._groups.setdefault(key, deque()).append(
            _Pending(item, future, _now(), deadline))
        self._queued += 1
        self._arrival.set()
        return await future

    async def close(self) -> None:
        """Stop taking items, run everything already queued, wait for it."""
        self._closed = True
        self._arrival.set()
        if self._dispatcher is not None:
            await self._dispatcher
        if self._running:
            await asyncio.gather(*self._running, return_exceptions=True)

    async def _dispatch(self) -> None:
        while True:
            await self._slots.acquire()
            batch = await self._next_batch()
            if batch is None:
                self._slots.release()
                return
            task = asyncio.get_running_loop().create_task(self._run(batch))
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    async def _next_batch(self) -> list[_Pending[T, R]] | None:
        """Wait for a batch of live items; None once closed and empty."""
        while True:
            while not self._groups:
                if self._closed:
                    return None
                self._arrival.clear()
                await self._arrival.wait()
            key, group = min(self._groups.items(), key=lambda kv: kv[1][0].enqueued)
            close_at = group[0].enqueued + self.max_delay_s
            while len(group) < self.max_batch_size and not self._closed:
                remaining = close_at - _now()
                if remaining <= 0:
                    break
                self._arrival.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._arrival.wait(), remaining)
            batch = self._take(key, group)
            if batch:
                return batch

    def _take(self, key: Hashable, group: deque[_Pending[T, R]]) -> list[_Pending[T, R]]:
        batch: list[_Pending[T, R]] = []
        now = _now()
        while group and len(batch) < self.max_batch_size:
            pending = group.popleft()
            self._queued -= 1
            if pending.future.done():  # the caller cancelled
                continue
            if pending.deadline is not None and now >= pending.deadline:
                pending.future.set_exception(DeadlineExceeded(
                    f"deadline passed after {now - pending.enqueued:.3f} s in the queue"))
                continue
            pending.started = now
            batch.append(pending)
        if not group:
            del self._groups[key]
        return batch

    async def _run(self, batch: list[_Pending[T, R]]) -> None:
        start = _now()
        try:
            results = await self._run_batch([p.item for p in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"run_batch returned {len(results)} results for "
                                   f"{len(batch)} items")
        except Exception as exc:
            log.debug("batch of %d failed: %r", len(batch), exc)
            for pending in batch:
                if not pending.future.done():
                    pending.future.set_exception(exc)
            return
        finally:
            self._slots.release()
        compute = _now() - start
        for pending, result in zip(batch, results, strict=True):
            info = BatchInfo(pending.started - pending.enqueued, compute, len(batch))
            if not pending.future.done():
                pending.future.set_result((result, info))
        if self._on_batch is not None:
            self._on_batch(BatchInfo(0.0, compute, len(batch)))
