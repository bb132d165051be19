"""The SDK's fake server (pretag.client.fake): a real gRPC server answering from a function,
for code that uses the SDK, and for the job itself."""

from __future__ import annotations

import json
from pathlib import Path

import grpc
import pytest

from pretag.client import Client, InvalidImage
from pretag.client.fake import FakeAnswer, fake_server
from pretag.job.run import RunConfig, run_job


def _answer(request_id: str, image: bytes) -> FakeAnswer:
    if image == b"broken":
        return FakeAnswer(error=(grpc.StatusCode.INVALID_ARGUMENT, f"{request_id}: not an image"))
    return FakeAnswer([(0.1, 0.2, 0.5, 0.6)], ["car"], [0.9])


def test_the_sdk_gets_the_scripted_answers():
    with fake_server(_answer, ("car", "person")) as address, Client(address) as client:
        pred = client.detect(b"an image", id="a.jpg")
        assert (pred.id, pred.labels) == ("a.jpg", ["car"])
        assert pred.boxes[0] == pytest.approx((0.1, 0.2, 0.5, 0.6))
        with pytest.raises(InvalidImage, match="not an image"):
            client.detect(b"broken", id="b.jpg")
        streamed = {p.id: p for p in client.detect_stream([("a", b"x"), ("b", b"broken")])}
        assert streamed["a"].error is None and isinstance(streamed["b"].error, InvalidImage)
        assert list(client.model_info().class_names) == ["car", "person"]


def test_the_job_runs_against_the_fake(tmp_path: Path):
    folder = tmp_path / "in"
    folder.mkdir()
    for name in ("a.jpg", "b.jpg"):
        (folder / name).write_bytes(b"bytes")
    (folder / "c.jpg").write_bytes(b"broken")
    with fake_server(_answer) as address:
        summary = run_job(RunConfig(folder, tmp_path / "out", servers=(address,), quiet=True,
                                    embeddings="none"))
    assert (summary.written, summary.failed) == (2, 1)
    root = tmp_path / "out" / ".lightly" / "predictions" / "lightly_pretagging"
    assert json.loads((root / "a.json").read_text())[0]["labels"] == ["car"]
