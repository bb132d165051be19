"""The pretag.v1.Pretagger servicer: Detect, DetectStream, ModelInfo."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

import grpc

from pretag.server.engine import Engine, EngineConfig, Result
from pretag.server.errors import Internal, ServeError, describe, grpc_code
from pretag.v1 import pretag_pb2 as pb
from pretag.v1 import pretag_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)


def deadline_of(context: grpc.aio.ServicerContext) -> float | None:
    """The call's deadline as a time.monotonic() value, or None."""
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


async def guarded_detect(engine: Engine, method: str, request_id: str, data: bytes,
                         threshold: float | None, deadline: float | None) -> Result:
    """engine.detect with every failure turned into a :class:`ServeError` and counted."""
    code = None  # stays None only for exits other than these (KeyboardInterrupt, ...)
    try:
        result = await engine.detect(data, threshold, deadline)
        code = "OK"
        return result
    except ServeError as exc:
        code = grpc_code(exc).name
        raise
    except asyncio.CancelledError:
        code = "CANCELLED"
        raise
    except Exception as exc:
        code = "INTERNAL"
        log.exception("request %r failed with an internal error", request_id)
        raise Internal(str(exc)) from exc
    finally:
        if engine.metrics is not None and code is not None:
            engine.metrics.count(method, code)


def to_response(request_id: str, result: Result) -> pb.DetectResponse:
    detections = [
        pb.Detection(x1=float(b[0]), y1=float(b[1]), x2=float(b[2]), y2=float(b[3]),
                     label=label, score=float(s))
        for b, label, s in zip(result.boxes, result.labels, result.scores, strict=True)
    ]
    info = result.info
    return pb.DetectResponse(
        id=request_id, detections=detections, width=result.width, height=result.height,
        timing=pb.Timing(queue_ms=info.queue_s * 1000, compute_ms=info.compute_s * 1000,
                         batch_size=info.batch_size))


def error_response(request_id: str, exc: BaseException) -> pb.DetectResponse:
    code = grpc_code(exc)
    return pb.DetectResponse(id=request_id, status=pb.Status(
        code=code.value[0], message=describe(exc, request_id)))


Req = TypeVar("Req")
Resp = TypeVar("Resp")


async def answer_concurrently(requests: AsyncIterator[Req],
                              handle: Callable[[Req], Awaitable[Resp]]) -> AsyncIterator[Resp]:
    """Run ``handle`` on every request of a stream at once; yield answers as they finish.

    ``handle`` must turn failures into answers itself. Ends after the client has
    half-closed and every answer is out; cancelling the stream cancels the rest.
    """
    out: asyncio.Queue[Resp | None] = asyncio.Queue()
    tasks: set[asyncio.Task[None]] = set()

    async def one(request: Req) -> None:
        await out.put(await handle(request))

    async def read() -> None:
        async for request in requests:
            task = asyncio.get_running_loop().create_task(one(request))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        while tasks:
            await asyncio.gather(*list(tasks), return_exceptions=True)
        await out.put(None)

    reader = asyncio.get_running_loop().create_task(read())
    try:
        while (response := await out.get()) is not None:
            yield response
        await reader
    finally:
        reader.cancel()
        for task in list(tasks):
            task.cancel()


def _threshold(request: pb.DetectRequest) -> float | None:
    return request.score_threshold if request.HasField("score_threshold") else None


class PretaggerService(pb_grpc.PretaggerServicer):
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    async def Detect(self, request: pb.DetectRequest,
                     context: grpc.aio.ServicerContext) -> pb.DetectResponse:
        try:
            result = await guarded_detect(self.engine, "Detect", request.id, request.image,
                                          _threshold(request), deadline_of(context))
        except ServeError as exc:
            await context.abort(grpc_code(exc), describe(exc, request.id))
        return to_response(request.id, result)

    async def DetectStream(self, request_iterator: AsyncIterator[pb.DetectRequest],
                           context: grpc.aio.ServicerContext
                           ) -> AsyncIterator[pb.DetectResponse]:
        """Answer items as they finish; each failure is reported in its own response."""
        deadline = deadline_of(context)

        async def one(request: pb.DetectRequest) -> pb.DetectResponse:
            try:
                result = await guarded_detect(self.engine, "DetectStream", request.id,
                                              request.image, _threshold(request), deadline)
            except ServeError as exc:
                return error_response(request.id, exc)
            return to_response(request.id, result)

        async for response in answer_concurrently(request_iterator, one):
            yield response

    async def ModelInfo(self, request: pb.ModelInfoRequest,
                        context: grpc.aio.ServicerContext) -> pb.ModelInfoResponse:
        spec = self.engine.spec
        cfg: EngineConfig = self.engine.config
        return pb.ModelInfoResponse(
            name=spec.name, class_names=list(spec.class_names),
            contract_version=spec.contract_version,
            providers=list(self.engine.backend.providers),
            batching=pb.BatchingConfig(max_batch_size=cfg.max_batch_size,
                                       max_queue_delay_ms=cfg.max_queue_delay_ms,
                                       max_queue=cfg.max_queue, instances=cfg.instances),
            default_score_threshold=self.engine.score_threshold,
            resize_json=spec.resize.to_json(), source_weights=spec.source_weights,
            source_sha256=spec.source_sha256, precision=spec.precision)
