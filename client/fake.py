"""A fake pretag server for code that uses the SDK: a real gRPC server (``pretag.v1.Pretagger``)
on a free local port that answers from a function instead of a model.

    from pretag.client import Client
    from pretag.client.fake import FakeAnswer, fake_server

    with fake_server(lambda id, image: FakeAnswer([(0.1, 0.1, 0.5, 0.5)], ["car"], [0.9])
                     ) as address, Client(address) as client:
        assert client.detect(b"...", id="a.jpg").labels == ["car"]

An answer with ``error`` set is refused with that status (unary: the call fails; in a
stream: that item's status, the stream goes on), as a real server refuses a bad image.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import grpc

from pretag.contract import CONTRACT_VERSION, ResizeSpec
from pretag.v1 import pretag_pb2 as pb
from pretag.v1 import pretag_pb2_grpc as pb_grpc


@dataclass(frozen=True)
class FakeAnswer:
    """What the fake answers for one image; boxes x1, y1, x2, y2 normalised."""

    boxes: Sequence[tuple[float, float, float, float]] = ()
    labels: Sequence[str] = ()
    scores: Sequence[float] = ()
    error: tuple[grpc.StatusCode, str] | None = None  # refuse the image with this status
    width: int = 640
    height: int = 480


#: (request id, image bytes) -> the answer
AnswerFn = Callable[[str, bytes], FakeAnswer]


def _nothing(request_id: str, image: bytes) -> FakeAnswer:
    return FakeAnswer()


class _Servicer(pb_grpc.PretaggerServicer):
    def __init__(self, answer: AnswerFn, class_names: Sequence[str]) -> None:
        self.answer = answer
        self.class_names = list(class_names)

    def _response(self, request: pb.DetectRequest, got: FakeAnswer) -> pb.DetectResponse:
        if got.error is not None:
            code, message = got.error
            return pb.DetectResponse(id=request.id, status=pb.Status(code=code.value[0],
                                                                     message=message))
        return pb.DetectResponse(
            id=request.id, width=got.width, height=got.height,
            detections=[pb.Detection(x1=b[0], y1=b[1], x2=b[2], y2=b[3], label=label,
                                     score=score)
                        for b, label, score in zip(got.boxes, got.labels, got.scores,
                                                   strict=True)])

    async def Detect(self, request: pb.DetectRequest, context: grpc.aio.ServicerContext
                     ) -> pb.DetectResponse:
        got = self.answer(request.id, request.image)
        if got.error is not None:
            await context.abort(*got.error)
        return self._response(request, got)

    async def DetectStream(self, request_iterator: AsyncIterator[pb.DetectRequest],
                           context: grpc.aio.ServicerContext) -> AsyncIterator[pb.DetectResponse]:
        async for request in request_iterator:
            yield self._response(request, self.answer(request.id, request.image))

    async def ModelInfo(self, request: pb.ModelInfoRequest, context: grpc.aio.ServicerContext
                        ) -> pb.ModelInfoResponse:
        return pb.ModelInfoResponse(
            name="fake", class_names=self.class_names, contract_version=CONTRACT_VERSION,
            providers=["Fake"], batching=pb.BatchingConfig(max_batch_size=1, max_queue=256,
                                                           instances=1),
            resize_json=ResizeSpec("longest_edge", 640).to_json(), source_sha256="0" * 64,
            precision="fp32", min_score_threshold=0.0)


@contextmanager
def fake_server(answer: AnswerFn | None = None, class_names: Sequence[str] = ("car",)
                ) -> Iterator[str]:
    """Serve ``answer`` on 127.0.0.1 (a free port) in a background thread; yields the
    address (``HOST:PORT``) for :class:`~pretag.client.Client`."""
    loop = asyncio.new_event_loop()
    port: list[int] = []
    server_box: list[grpc.aio.Server] = []

    async def start() -> None:
        server = grpc.aio.server()
        pb_grpc.add_PretaggerServicer_to_server(_Servicer(answer or _nothing, class_names),
                                                server)
        port.append(server.add_insecure_port("127.0.0.1:0"))
        await server.start()
        server_box.append(server)

    thread = threading.Thread(target=loop.run_forever, daemon=True, name="pretag-fake")
    thread.start()
    asyncio.run_coroutine_threadsafe(start(), loop).result(30)
    try:
        yield f"127.0.0.1:{port[0]}"
    finally:
        asyncio.run_coroutine_threadsafe(server_box[0].stop(None), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(30)
        loop.close()
