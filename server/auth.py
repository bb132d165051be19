"""Bearer-token authentication: one interceptor; health checks stay open."""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from pretag.server.metrics import Metrics

OPEN_PREFIXES = ("/grpc.health.v1.Health/",)


def bearer_token(header: str | bytes) -> bytes | None:
    """The credentials of an ``authorization`` header with the Bearer scheme (RFC 6750;
    scheme names are case-insensitive), or None."""
    text = header.decode("latin-1") if isinstance(header, bytes) else header
    scheme, _, credentials = text.strip().partition(" ")
    if scheme.lower() != "bearer" or not credentials.strip():
        return None
    return credentials.strip().encode("latin-1")


class TokenAuth(grpc.aio.ServerInterceptor):
    """Requires ``authorization: Bearer <token>``; refusals are counted as UNAUTHENTICATED."""

    def __init__(self, token: str, metrics: Metrics | None = None) -> None:
        self._expected = token.encode("latin-1")
        self.metrics = metrics

    async def intercept_service(self, continuation: Callable[[Any], Awaitable[Any]],
                                details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(details)
        if handler is None or details.method.startswith(OPEN_PREFIXES):
            return handler
        metadata = dict(details.invocation_metadata or ())
        given = bearer_token(metadata.get("authorization", ""))
        if given is not None and hmac.compare_digest(given, self._expected):
            return handler
        if self.metrics is not None:
            self.metrics.count(details.method.rsplit("/", 1)[-1], "UNAUTHENTICATED")
        return _deny(handler)


def _deny(handler: Any) -> Any:
    async def abort(request: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token")

    kind = (handler.request_streaming, handler.response_streaming)
    make = {(False, False): grpc.unary_unary_rpc_method_handler,
            (False, True): grpc.unary_stream_rpc_method_handler,
            (True, False): grpc.stream_unary_rpc_method_handler,
            (True, True): grpc.stream_stream_rpc_method_handler}[kind]
    return make(abort, request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)
