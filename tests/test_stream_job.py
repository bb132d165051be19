"""The streaming job's retry, requeue, backoff, stall and failover logic against scripted
fake servers: no sockets, no model. Each fake answers an image with one box labelled by
the server's name, so the files show which server did the work."""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from collections.abc import AsyncIterable, AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import looptime
import pytest
from tqdm import tqdm

from pretag.client.api import Connection, Overloaded, Prediction, Unavailable
from pretag.job.outputs import read_prediction
from pretag.job.sources import ImageItem
from pretag.job.stats import Histogram
from pretag.job.stream import Ask, Job, JobState, RunError, StreamSettings, Target
from pretag.job.vectors import VectorStore


@dataclass
class FakeServer:
    """A scripted server. ``down``: every stream fails at once; ``fail_after``: a stream
    breaks after that many answers (from then on the server is down); ``stall_after``:
    it stops answering but keeps the stream open; ``overloaded``: each image is refused
    this many times before it is answered; ``poison``: an image that breaks the stream."""

    name: str
    down: bool = False
    fail_after: int | None = None
    stall_after: int | None = None
    overloaded: int = 0
    poison: str | None = None
    delay_s: float = 0.001  # per answer
    answered: Counter[str] = field(default_factory=Counter)
    refused: Counter[str] = field(default_factory=Counter)
    streams: list[float] = field(default_factory=list)  # when each stream was opened

    def answer(self, item_id: str) -> Prediction:
        if self.refused[item_id] < self.overloaded:
            self.refused[item_id] += 1
            return Prediction(item_id, error=Overloaded("queue full",
                                                        grpc.StatusCode.RESOURCE_EXHAUSTED))
        self.answered[item_id] += 1
        return Prediction(item_id, [(0.1, 0.1, 0.5, 0.5)], [self.name], [0.9])


class FakeClient:
    def __init__(self, server: FakeServer) -> None:
        self.server = server

    async def __aenter__(self) -> FakeClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None

    async def detect_stream(self, items: AsyncIterable[tuple[str, bytes]],
                            score_threshold: float | None = None, *,
                            embeddings: str = "none",
                            pixel_metadata: bool = False,
                            class_probabilities: bool = False) -> AsyncIterator[Prediction]:
        server = self.server
        server.streams.append(asyncio.get_running_loop().time())  # the fake clock
        if server.down:
            raise Unavailable("connection refused", grpc.StatusCode.UNAVAILABLE)
        async for item_id, _data in items:
            if item_id == server.poison:
                raise Unavailable("stream reset", grpc.StatusCode.UNAVAILABLE)
            total = sum(server.answered.values())
            if server.fail_after is not None and total >= server.fail_after:
                server.down = True
                raise Unavailable("server went away", grpc.StatusCode.UNAVAILABLE)
            if server.stall_after is not None and total >= server.stall_after:
                await asyncio.Event().wait()  # open, silent, forever
            await asyncio.sleep(server.delay_s)
            yield server.answer(item_id)


def run_job(tmp_path: Path, servers: list[FakeServer], count: int = 40,
            vectors: VectorStore | None = None, fake_clock: bool = True,
            embeddings: str = "none", **settings: Any
            ) -> tuple[JobState, Counter[str], list[ImageItem]]:
    folder = tmp_path / "in"
    folder.mkdir(parents=True, exist_ok=True)
    items = []
    for i in range(count):
        path = folder / f"img{i:03d}.jpg"
        path.write_bytes(b"fake image bytes")
        items.append(ImageItem(path, path.name))
    by_address = {s.name: s for s in servers}
    targets = [Target(Connection(s.name), window=4, max_message_bytes=2**20) for s in servers]
    state = JobState(Histogram([s.name for s in servers]))
    finished: Counter[str] = Counter()
    options = {"server_timeout_s": 2.0, "backoff_first_s": 0.05, "backoff_max_s": 0.4,
               **settings}
    job = Job(targets, items, tmp_path / "out", state, StreamSettings(**options),
              Ask(0.5, embeddings), tqdm(disable=True),
              on_result=lambda name, ok: finished.update([name]),
              connect=lambda c: FakeClient(by_address[c.address]), vectors=vectors)
    # the loop's fake clock drives the backoff and the stall watchdog (the job reads it):
    # waits cost no real time. Real time where a test measures the delays themselves.
    loop = (looptime.new_event_loop(start=0.0, _enabled=True) if fake_clock
            else asyncio.new_event_loop())
    try:
        loop.run_until_complete(asyncio.wait_for(job.run(), 60))
    finally:
        loop.close()
    return state, finished, items


def _labels(tmp_path: Path, items: list[ImageItem]) -> Counter[str]:
    labels: Counter[str] = Counter()
    for item in items:
        entry = read_prediction(tmp_path / "out", item.name)
        assert entry is not None, item.name
        labels.update(entry["labels"])
    return labels


def test_one_server_answers_everything_once(tmp_path: Path):
    server = FakeServer("a")
    state, finished, items = run_job(tmp_path, [server])
    assert state.written == 40 and not state.errors
    assert set(finished.values()) == {1} and len(finished) == 40
    assert _labels(tmp_path, items) == Counter({"a": 40})


def test_failover_moves_a_dead_server_s_work_to_the_other(tmp_path: Path):
    dying, healthy = FakeServer("a", fail_after=5), FakeServer("b")
    state, finished, items = run_job(tmp_path, [dying, healthy])
    assert state.written == 40 and not state.errors
    assert set(finished.values()) == {1}  # every image finished exactly once
    labels = _labels(tmp_path, items)
    assert labels["a"] == 5 and labels["b"] == 35


def test_a_silent_stream_is_abandoned_and_its_images_finish_elsewhere(tmp_path: Path):
    frozen, healthy = FakeServer("a", stall_after=3), FakeServer("b")
    start = time.monotonic()
    state, finished, items = run_job(tmp_path, [frozen, healthy], server_timeout_s=0.5)
    assert state.written == 40 and not state.errors and set(finished.values()) == {1}
    assert _labels(tmp_path, items)["a"] == 3
    assert time.monotonic() - start < 10


def test_a_lone_silent_server_ends_the_job_with_run_error(tmp_path: Path):
    with pytest.raises(RunError, match=r"no server answered for 0\.5 s; 37 images left"):
        run_job(tmp_path, [FakeServer("a", stall_after=3)], server_timeout_s=0.5)


def test_overloaded_images_are_retried_then_reported(tmp_path: Path):
    patient = FakeServer("a", overloaded=2)
    fast = {"backoff_first_s": 0.01, "backoff_max_s": 0.02}
    state, _, _ = run_job(tmp_path, [patient], count=10, **fast)
    assert state.written == 10 and not state.errors
    assert set(patient.refused.values()) == {2}
    strict = FakeServer("a", overloaded=2)
    state, _, _ = run_job(tmp_path / "strict", [strict], count=10, max_attempts=2, **fast)
    assert state.written == 0
    assert {e["code"] for e in state.errors} == {"RESOURCE_EXHAUSTED"} and len(state.errors) == 10


def test_an_image_that_keeps_breaking_streams_ends_in_errors(tmp_path: Path):
    server = FakeServer("a", poison="img007.jpg")
    state, finished, _ = run_job(tmp_path, [server], count=20, max_attempts=3,
                                 server_timeout_s=30)
    assert state.written == 19 and set(finished.values()) == {1}
    [error] = state.errors
    assert error["filename"] == "img007.jpg" and error["code"] == "STREAM"
    assert "lost 3 times" in error["reason"]


def test_a_failing_server_is_retried_with_growing_delays_then_given_up(tmp_path: Path):
    down, healthy = FakeServer("a", down=True), FakeServer("b", delay_s=0.01)
    state, _, _ = run_job(tmp_path, [down, healthy], count=200, server_timeout_s=1.0,
                          fake_clock=False)
    assert state.written == 200
    gaps = [b - a for a, b in zip(down.streams, down.streams[1:], strict=False)]
    assert len(gaps) >= 3
    assert gaps[0] >= 0.05 and gaps[1] >= 0.1 and gaps[2] >= 0.2  # 0.05 s, doubling
    assert all(g <= 0.4 + 0.3 for g in gaps)  # capped at backoff_max_s (+ scheduling slack)


def test_prediction_files_are_what_the_server_answered(tmp_path: Path):
    run_job(tmp_path, [FakeServer("a")], count=3)
    entry = json.loads((tmp_path / "out" / ".lightly" / "predictions" / "lightly_pretagging"
                        / "img001.json").read_text())
    from pretag.job.health import content_hash

    assert entry == [{"filename": "img001.jpg", "boxes": [[0.1, 0.1, 0.5, 0.5]],
                      "labels": ["a"], "scores": [0.9],
                      "content_hash": content_hash(b"fake image bytes")}]


def test_answers_without_the_vectors_asked_for_are_reported(tmp_path: Path):
    """A server that ignores the request's embeddings field (an older one): each image ends
    in errors.jsonl instead of stopping the job."""
    store = VectorStore(tmp_path / "out", "image", shard_images=1024)
    state, finished, _ = run_job(tmp_path, [FakeServer("a")], count=5, vectors=store,
                                 embeddings="image")
    assert state.written == 0 and set(finished.values()) == {1}
    assert [e["code"] for e in state.errors] == ["VECTORS"] * 5
    assert "no image vector" in state.errors[0]["reason"]
    assert not list((tmp_path / "out").rglob("*.json"))  # no prediction without its vectors
