"""The retry clock of :mod:`pretag.job.stream`'s workers."""

from __future__ import annotations

import time
from collections.abc import Callable


class Backoff:
    """Exponential backoff of one stream worker: each failure doubles the wait (up to
    ``max_s``), a success resets it; ``failing_for`` says how long it has failed.
    ``clock``: the event loop's (``loop.time``), so that a fake loop clock drives it."""

    def __init__(self, first_s: float, max_s: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.first_s, self.max_s = first_s, max_s
        self.clock = clock
        self.delay = first_s
        self.failing_since: float | None = None
        self.paused_until = 0.0

    def ok(self) -> None:
        self.delay, self.failing_since = self.first_s, None

    def fail(self) -> float:
        if self.failing_since is None:
            self.failing_since = self.clock()
        delay, self.delay = self.delay, min(self.delay * 2, self.max_s)
        return delay

    def pause(self) -> None:
        self.paused_until = self.clock() + self.fail()

    def pause_left(self) -> float:
        return max(0.0, self.paused_until - self.clock())

    def failing_for(self) -> float:
        return 0.0 if self.failing_since is None else self.clock() - self.failing_since
