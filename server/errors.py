"""The server's error taxonomy, mapped to gRPC status codes in this one place.

Every failure a request can meet is one of these classes. The servicers catch
:class:`ServeError` and turn it into a status with :func:`grpc_code`; anything
else is an internal error, logged with the request id and answered INTERNAL.
"""

from __future__ import annotations

import grpc

from pretag.runtime.detections import request_message


class ServeError(Exception):
    """A request failed for a reason the caller should be told about."""

    code = grpc.StatusCode.INTERNAL


class InvalidInput(ServeError):
    """Undecodable, empty or oversized image, or a malformed request."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class Unsupported(ServeError):
    """Something this model does not offer (vectors from a model without them)."""

    code = grpc.StatusCode.UNIMPLEMENTED


class QueueFull(ServeError):
    """The bounded queue is full; retry later or elsewhere."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(ServeError):
    """Not warm yet, or draining for shutdown."""

    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(ServeError):
    """The caller's deadline passed before the image reached the model."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Unauthenticated(ServeError):
    """Missing or wrong bearer token."""

    code = grpc.StatusCode.UNAUTHENTICATED


class NotFound(ServeError):
    """A model name this server does not serve (KServe protocol)."""

    code = grpc.StatusCode.NOT_FOUND


class Internal(ServeError):
    """A bug or a model failure; the log has the details under the request id."""

    code = grpc.StatusCode.INTERNAL


def grpc_code(exc: BaseException) -> grpc.StatusCode:
    """The gRPC status code for any exception (INTERNAL for the unexpected)."""
    return exc.code if isinstance(exc, ServeError) else grpc.StatusCode.INTERNAL


def describe(exc: BaseException, request_id: str) -> str:
    """The message sent to the caller: the request id and, for known errors, the reason."""
    if isinstance(exc, ServeError) and not isinstance(exc, Internal):
        return request_message(request_id, str(exc))
    return f"request {request_id!r}: internal error (see the server log for this id)"
