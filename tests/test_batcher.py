"""DynamicBatcher with a fake model: composition, delay, errors, cancellation, deadlines, queue.

Every test runs on an event loop with a fake clock (looptime): time moves only when
every task waits, so sleeps order events deterministically and durations are exact.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import looptime
import pytest

from pretag.server.batcher import DynamicBatcher
from pretag.server.errors import DeadlineExceeded, QueueFull, Unavailable


class FakeModel:
    """Doubles its inputs; records every batch; can be slowed, gated or made to fail."""

    def __init__(self, delay_s: float = 0.0, fail_on: int | None = None) -> None:
        self.batches: list[list[int]] = []
        self.delay_s = delay_s
        self.fail_on = fail_on
        self.gate: asyncio.Event | None = None

    async def __call__(self, items: Sequence[int]) -> list[int]:
        self.batches.append(list(items))
        if self.gate is not None:
            await self.gate.wait()
        await asyncio.sleep(self.delay_s)
        if self.fail_on is not None and self.fail_on in items:
            raise RuntimeError(f"model failed on {self.fail_on}")
        return [2 * i for i in items]


def run(coro):
    loop = looptime.new_event_loop(start=0.0, _enabled=True)
    try:
        return loop.run_until_complete(asyncio.wait_for(coro, 10))
    finally:
        loop.close()


def now() -> float:
    return asyncio.get_running_loop().time()


async def occupied(model: FakeModel, max_batch_size: int, max_queue: int = 256
                   ) -> tuple[DynamicBatcher, asyncio.Future]:
    """A batcher whose only model instance is busy with item 0 until ``model.gate`` opens."""
    model.gate = asyncio.Event()
    b = DynamicBatcher(model, max_batch_size=max_batch_size, max_delay_s=0.0,
                       max_queue=max_queue)
    busy = asyncio.ensure_future(b.submit(0))
    await asyncio.sleep(0.01)
    return b, busy


def test_concurrent_submissions_form_full_batches_in_order():
    async def main() -> None:
        model = FakeModel()
        b = DynamicBatcher(model, max_batch_size=4, max_delay_s=0.05)
        results = await asyncio.gather(*(b.submit(i) for i in range(10)))
        assert [r for r, _ in results] == [2 * i for i in range(10)]
        assert model.batches == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
        assert [info.batch_size for _, info in results] == [4] * 8 + [2] * 2
        await b.close()
    run(main())


def test_lone_item_waits_at_most_the_max_delay():
    async def main() -> None:
        model = FakeModel()
        b = DynamicBatcher(model, max_batch_size=8, max_delay_s=0.05)
        start = now()
        result, info = await b.submit(3)
        assert result == 6 and info.batch_size == 1
        assert now() - start == pytest.approx(0.05)
        assert info.queue_s == pytest.approx(0.05)
        # zero delay: no waiting at all for a batch to fill
        b0 = DynamicBatcher(model, max_batch_size=8, max_delay_s=0.0)
        start = now()
        await b0.submit(1)
        assert now() - start == 0
        await b.close()
        await b0.close()
    run(main())


def test_items_arriving_while_the_model_is_busy_form_the_next_batch():
    async def main() -> None:
        model = FakeModel()
        b, first = await occupied(model, max_batch_size=8)
        rest = [asyncio.ensure_future(b.submit(i)) for i in range(1, 6)]
        await asyncio.sleep(0.01)
        model.gate.set()
        await asyncio.gather(first, *rest)
        assert model.batches == [[0], [1, 2, 3, 4, 5]]
        await b.close()
    run(main())


def test_items_are_grouped_by_key():
    async def main() -> None:
        model = FakeModel()
        b = DynamicBatcher(model, max_batch_size=8, max_delay_s=0.02)
        keys = ["small", "large", "small", "large", "small"]
        await asyncio.gather(*(b.submit(i, key=k) for i, k in enumerate(keys)))
        assert sorted(model.batches) == [[0, 2, 4], [1, 3]]
        await b.close()
    run(main())


def test_a_failing_batch_fails_every_caller_in_it_and_nothing_else():
    async def main() -> None:
        model = FakeModel(fail_on=2)
        b = DynamicBatcher(model, max_batch_size=4, max_delay_s=0.05)
        results = await asyncio.gather(*(b.submit(i) for i in range(6)),
                                       return_exceptions=True)
        assert all(isinstance(r, RuntimeError) for r in results[:4])
        assert [r[0] for r in results[4:]] == [8, 10]  # type: ignore[index]
        # the batcher survives the failure
        assert (await b.submit(7))[0] == 14
        await b.close()
    run(main())


def test_cancelled_callers_are_dropped_before_compute():
    async def main() -> None:
        model = FakeModel()
        b, busy = await occupied(model, max_batch_size=8)
        waiting = [asyncio.ensure_future(b.submit(i)) for i in (1, 2, 3)]
        await asyncio.sleep(0.01)
        waiting[1].cancel()
        model.gate.set()
        results = await asyncio.gather(busy, waiting[0], waiting[2])
        assert [r for r, _ in results] == [0, 2, 6]
        assert model.batches == [[0], [1, 3]]
        await b.close()
    run(main())


def test_expired_deadlines_are_dropped_before_compute():
    async def main() -> None:
        model = FakeModel()
        b, busy = await occupied(model, max_batch_size=8)
        late = asyncio.ensure_future(b.submit(1, deadline=now() + 0.02))
        fine = asyncio.ensure_future(b.submit(2, deadline=now() + 5))
        await asyncio.sleep(0.05)
        model.gate.set()
        with pytest.raises(DeadlineExceeded):
            await late
        assert (await fine)[0] == 4
        await busy
        assert model.batches == [[0], [2]]
        await b.close()
    run(main())


def test_full_queue_rejects_instead_of_growing():
    async def main() -> None:
        model = FakeModel()
        b, busy = await occupied(model, max_batch_size=2, max_queue=3)
        queued = [asyncio.ensure_future(b.submit(i)) for i in (1, 2, 3)]
        await asyncio.sleep(0.01)
        assert b.queued == 3
        with pytest.raises(QueueFull):
            await b.submit(4)
        model.gate.set()
        await asyncio.gather(busy, *queued)
        assert (await b.submit(5))[0] == 10  # room again
        await b.close()
    run(main())


def test_instances_run_batches_concurrently():
    async def main() -> None:
        model = FakeModel(delay_s=0.2)
        b = DynamicBatcher(model, max_batch_size=1, max_delay_s=0.0, instances=4)
        start = now()
        await asyncio.gather(*(b.submit(i) for i in range(4)))
        assert now() - start == pytest.approx(0.2)  # 4 x 0.2 s side by side, not in series
        await b.close()
    run(main())


def test_close_finishes_queued_work_then_refuses():
    async def main() -> None:
        model = FakeModel(delay_s=0.01)
        b = DynamicBatcher(model, max_batch_size=2, max_delay_s=0.0)
        pending = [asyncio.ensure_future(b.submit(i)) for i in range(5)]
        await asyncio.sleep(0)
        await b.close()
        assert [r for r, _ in await asyncio.gather(*pending)] == [0, 2, 4, 6, 8]
        with pytest.raises(Unavailable):
            await b.submit(9)
    run(main())
