"""The retry clock of :mod:`pretag.job.stream`'s workers."""

from __future__ import annotations

import time


class Backoff:
    """Exponential backoff of one stream worker: each failure doubles the wait (up to
    ``max_s``), a success resets it; ``failing_for`` says how long it has failed."""

    def __init__(self, first_s: float, max_s: float) -> None:
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
