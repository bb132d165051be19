"""Plumbing shared by the servicers: deadlines, guarded detect, concurrent stream answers,
and the interceptor that turns undecodable request messages into INVALID_ARGUMENT.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc

from pretag.preprocess import Pixels
from pretag.server.engine import Engine, Reservation, Result
from pretag.server.errors import Internal, InvalidInput, ServeError, grpc_code
from pretag.server.metrics import Metrics

log = logging.getLogger(__name__)


def deadline_of(context: grpc.aio.ServicerContext) -> float | None:
    """The call's deadline on the event loop's clock, or None."""
    remaining = context.time_remaining()
    return None if remaining is None else asyncio.get_running_loop().time() + remaining


async def guarded_detect(engine: Engine, method: str, request_id: str, data: bytes | Pixels,
                         threshold: float | None, deadline: float | None,
                         reservation: Reservation | None = None,
                         pixel_metadata: bool = False) -> Result:
    """engine.detect with every failure turned into a :class:`ServeError` and counted."""
    code = None  # stays None only for exits other than these (KeyboardInterrupt, ...)
    try:
        result = await engine.detect(data, threshold, deadline, reservation, pixel_metadata)
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


Req = TypeVar("Req")
Resp = TypeVar("Resp")
_END: Any = object()


async def answer_concurrently(requests: AsyncIterator[Req],
                              handle: Callable[[Req], Awaitable[Resp]],
                              stop: asyncio.Event | None = None) -> AsyncIterator[Resp]:
    """Run ``handle`` on every request of a stream at once; yield answers as they finish.

    ``handle`` must turn failures into answers itself. Ends after the client has
    half-closed, or ``stop`` is set, and every answer to what was read is out. An
    error while reading requests (an undecodable message) is raised here once the
    answers so far are out. Cancelling the stream cancels the rest.
    """
    out: asyncio.Queue[Any] = asyncio.Queue()
    tasks: set[asyncio.Task[None]] = set()
    loop = asyncio.get_running_loop()

    async def one(request: Req) -> None:
        await out.put(await handle(request))

    async def read() -> None:
        iterator = aiter(requests)
        stopped = asyncio.ensure_future(stop.wait()) if stop is not None else None
        try:
            while True:
                nxt = asyncio.ensure_future(anext(iterator, _END))
                if stopped is not None:
                    await asyncio.wait([nxt, stopped], return_when=asyncio.FIRST_COMPLETED)
                    if not nxt.done():  # draining: read no more
                        nxt.cancel()
                        break
                request = await nxt
                if request is _END:
                    break
                task = loop.create_task(one(request))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
        finally:
            if stopped is not None:
                stopped.cancel()
            while tasks:
                await asyncio.gather(*list(tasks), return_exceptions=True)

    reader = loop.create_task(read())
    reader.add_done_callback(lambda _: out.put_nowait(_END))
    try:
        while (response := await out.get()) is not _END:
            yield response
        await reader  # raises what stopped the reading, if anything did
    finally:
        reader.cancel()
        for task in list(tasks):
            task.cancel()


class Undecodable:
    """Stands for a request message that did not parse."""

    def __init__(self, error: str) -> None:
        self.error = error


class UndecodableMessage(InvalidInput):
    """A request message on the wire is not the protobuf message the method takes."""


def _lenient(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any]:
    def parse(data: bytes) -> Any:
        if deserializer is None:
            return data
        try:
            return deserializer(data)
        except Exception as exc:  # protobuf's DecodeError, or any parser's failure
            return Undecodable(f"{type(exc).__name__}: {exc}")
    return parse


async def _checked(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
    async for request in requests:
        if isinstance(request, Undecodable):
            raise UndecodableMessage(f"undecodable request message ({request.error})")
        yield request


class MessageGuard(grpc.aio.ServerInterceptor):
    """Undecodable request messages end the call with INVALID_ARGUMENT, logged once a call.

    Without it, grpc answers a unary call UNKNOWN with a traceback in the log, and a
    stream's reader fails where the servicer never hears of it.
    """

    def __init__(self, metrics: Metrics | None = None) -> None:
        self.metrics = metrics

    async def intercept_service(self, continuation: Callable[[Any], Awaitable[Any]],
                                details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(details)
        if handler is None:
            return handler
        method = details.method.rsplit("/", 1)[-1]
        refuse = self._refuser(method)
        parse = _lenient(handler.request_deserializer)
        if handler.request_streaming and handler.response_streaming:
            inner_ss = handler.stream_stream

            async def stream_stream(requests: Any, context: Any) -> AsyncIterator[Any]:
                try:
                    async for response in inner_ss(_checked(requests), context):
                        yield response
                except UndecodableMessage as exc:
                    await refuse(context, str(exc))
            return handler._replace(request_deserializer=parse, stream_stream=stream_stream)
        if not handler.request_streaming and not handler.response_streaming:
            inner_uu = handler.unary_unary

            async def unary_unary(request: Any, context: Any) -> Any:
                if isinstance(request, Undecodable):
                    await refuse(context, f"undecodable request message ({request.error})")
                return await inner_uu(request, context)
            return handler._replace(request_deserializer=parse, unary_unary=unary_unary)
        return handler  # no such methods in pretag's services

    def _refuser(self, method: str) -> Callable[[Any, str], Awaitable[None]]:
        async def refuse(context: grpc.aio.ServicerContext, message: str) -> None:
            log.warning("%s: %s", method, message)
            if self.metrics is not None:
                self.metrics.count(method, grpc.StatusCode.INVALID_ARGUMENT.name)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, message)
        return refuse
