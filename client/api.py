"""Python client for pretag servers, sync (:class:`Client`) and asyncio (:class:`AsyncClient`).

gRPC errors become one small exception hierarchy rooted at :class:`PretagError`;
in streams, a failed item comes back as a :class:`Prediction` whose ``error`` is set.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeAlias

import grpc
import numpy as np

from pretag.preprocess import Pixels
from pretag.v1 import pretag_pb2 as pb
from pretag.v1 import pretag_pb2_grpc as pb_grpc


class PretagError(Exception):
    """Any failure reported by a pretag server or the connection to it."""

    retryable = False

    def __init__(self, message: str, code: grpc.StatusCode = grpc.StatusCode.UNKNOWN) -> None:
        super().__init__(message)
        self.code = code


class InvalidImage(PretagError):
    """The image (or request) was refused: undecodable, empty, too large."""


class Unsupported(PretagError):
    """The server's model does not offer what was asked (e.g. vectors it does not give)."""


class Overloaded(PretagError):
    """The server's queue is full; retry later or elsewhere."""

    retryable = True


class Unavailable(PretagError):
    """The server is unreachable, warming up or draining; retry later or elsewhere."""

    retryable = True


class DeadlineExceeded(PretagError):
    """The call's deadline passed."""

    retryable = True


class Unauthenticated(PretagError):
    """Missing or wrong token, or TLS refused."""


class ServerError(PretagError):
    """An internal error on the server (its log has the request id)."""


_BY_CODE: dict[grpc.StatusCode, type[PretagError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidImage,
    grpc.StatusCode.UNIMPLEMENTED: Unsupported,
    grpc.StatusCode.RESOURCE_EXHAUSTED: Overloaded,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
}
_CODE_BY_VALUE = {c.value[0]: c for c in grpc.StatusCode}


def error_from(code: grpc.StatusCode | int, message: str) -> PretagError:
    """The exception for a status code (a grpc.StatusCode or its integer value)."""
    if isinstance(code, int):
        code = _CODE_BY_VALUE.get(code, grpc.StatusCode.UNKNOWN)
    return _BY_CODE.get(code, ServerError)(message, code)


# What grpc's connect error says when the TLS handshake itself failed (wrong CA,
# expired or mismatched certificate): a refusal that retrying cannot fix.
_HANDSHAKE_MARKS = ("handshake failed", "certificate_verify_failed", "ssl_error_ssl",
                    "tsi_protocol_failure")


def _from_rpc(exc: grpc.RpcError, connection: Connection | None = None) -> PretagError:
    code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
    details = (exc.details() if hasattr(exc, "details") else str(exc)) or str(code)
    if code == grpc.StatusCode.UNAVAILABLE:
        lowered = details.lower()
        if any(mark in lowered for mark in _HANDSHAKE_MARKS):
            return Unauthenticated(f"TLS handshake failed: {details}",
                                   grpc.StatusCode.UNAUTHENTICATED)
        if connection is not None and connection.client_cert and "socket closed" in lowered:
            details += (" (with TLS 1.3 a server that refuses the client certificate "
                        "shows as this too)")
    return error_from(code, details)


#: what to ask for beside the detections (DetectRequest.embeddings)
EMBEDDINGS = {"none": pb.EMBEDDINGS_NONE, "image": pb.EMBEDDINGS_IMAGE,
              "objects": pb.EMBEDDINGS_OBJECTS, "all": pb.EMBEDDINGS_ALL}


@dataclass(frozen=True)
class Prediction:
    """One image's answer. Boxes are (x1, y1, x2, y2) normalised to [0, 1].

    ``embedding`` [D], ``object_embeddings`` [n, E] and ``class_probabilities`` [n, C]
    (a row per detection, C the model's classes in ModelInfo order) are set when they
    were asked for.
    """

    id: str
    boxes: list[tuple[float, float, float, float]] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)
    width: int = 0
    height: int = 0
    queue_ms: float = 0.0
    compute_ms: float = 0.0
    batch_size: int = 0
    error: PretagError | None = None
    embedding: np.ndarray | None = None
    object_embeddings: np.ndarray | None = None
    #: Lightly's pixel metadata (pretag.health keys but width/height), when asked for
    metadata: dict[str, float] | None = None
    class_probabilities: np.ndarray | None = None

    @classmethod
    def from_proto(cls, r: pb.DetectResponse) -> Prediction:
        if r.status.code != 0:
            return cls(r.id, error=error_from(r.status.code, r.status.message))
        dets = r.detections
        objects = None
        if dets and len(dets[0].embedding):
            objects = np.array([d.embedding for d in dets], dtype=np.float32)
        probabilities = None
        if dets and len(dets[0].class_probabilities):
            probabilities = np.array([d.class_probabilities for d in dets], dtype=np.float32)
        return cls(r.id, [(d.x1, d.y1, d.x2, d.y2) for d in dets], [d.label for d in dets],
                   [d.score for d in dets], r.width, r.height, r.timing.queue_ms,
                   r.timing.compute_ms, r.timing.batch_size,
                   embedding=np.array(r.embedding, dtype=np.float32) if len(r.embedding)
                   else None, object_embeddings=objects,
                   metadata=_metadata(r) if r.HasField("pixel_metadata") else None,
                   class_probabilities=probabilities)


def _metadata(r: pb.DetectResponse) -> dict[str, float]:
    """A response's pixel metadata under Lightly's names (see :mod:`pretag.health`)."""
    m = r.pixel_metadata
    return {"width": float(r.width), "height": float(r.height), "sharpness": m.sharpness,
            "contrast": m.contrast, "meanRed": m.mean_red, "meanGreen": m.mean_green,
            "meanBlue": m.mean_blue, "uniformRowRatio": m.uniform_row_ratio}


@dataclass(frozen=True)
class Connection:
    """How to reach a server: address, optional token and TLS files."""

    address: str
    token: str | None = None
    root_cert: Path | None = None  # CA bundle that signed the server's cert; enables TLS
    client_cert: Path | None = None  # for mutual TLS
    client_key: Path | None = None
    max_message_mb: int = 64

    def options(self) -> list[tuple[str, Any]]:
        limit = self.max_message_mb * 1024 * 1024
        return [("grpc.max_send_message_length", limit),
                ("grpc.max_receive_message_length", limit)]

    def credentials(self) -> grpc.ChannelCredentials | None:
        if self.root_cert is None:
            return None
        return grpc.ssl_channel_credentials(
            self.root_cert.read_bytes(),
            self.client_key.read_bytes() if self.client_key else None,
            self.client_cert.read_bytes() if self.client_cert else None)

    def metadata(self) -> tuple[tuple[str, str], ...] | None:
        return (("authorization", f"Bearer {self.token}"),) if self.token else None


#: What a request carries: an encoded image file, or decoded pixels (a video frame).
Image: TypeAlias = bytes | Pixels


def raw_image(pixels: Pixels) -> pb.RawImage:
    """Pixels as a request field (BGR, with the original size when they were resized)."""
    image = np.ascontiguousarray(pixels.image)
    height, width = image.shape[:2]
    original = pixels.original or (0, 0)
    return pb.RawImage(pixels=image.tobytes(), height=height, width=width,
                       format=pb.PIXEL_FORMAT_BGR24, original_height=original[0],
                       original_width=original[1])


def _request(item_id: str, image: Image, threshold: float | None,
             embeddings: str = "none", pixel_metadata: bool = False,
             class_probabilities: bool = False) -> pb.DetectRequest:
    request = pb.DetectRequest(id=item_id, embeddings=EMBEDDINGS[embeddings],
                               pixel_metadata=pixel_metadata,
                               class_probabilities=class_probabilities)
    if isinstance(image, Pixels):
        request.raw.CopyFrom(raw_image(image))
    else:
        request.image = image
    if threshold is not None:
        request.score_threshold = threshold
    return request


class Client:
    """Blocking client. ``with Client("host:50051") as c: c.detect(data)``."""

    def __init__(self, address: str | Connection, **kwargs: Any) -> None:
        self.connection = address if isinstance(address, Connection) else Connection(
            address, **kwargs)
        c = self.connection
        creds = c.credentials()
        self._channel = (grpc.secure_channel(c.address, creds, c.options()) if creds
                         else grpc.insecure_channel(c.address, c.options()))
        self._stub = pb_grpc.PretaggerStub(self._channel)

    def detect(self, image: Image, id: str = "", score_threshold: float | None = None,
               timeout: float | None = None, embeddings: str = "none",
               pixel_metadata: bool = False, class_probabilities: bool = False
               ) -> Prediction:
        """``embeddings``: none, image, objects or all (vectors from the same pass);
        ``pixel_metadata``: also the image's pixel metadata (``Prediction.metadata``);
        ``class_probabilities``: each detection's class distribution, from a model that
        gives one (ModelInfo.class_probabilities)."""
        try:
            response = self._stub.Detect(_request(id, image, score_threshold, embeddings,
                                                  pixel_metadata, class_probabilities),
                                         timeout=timeout, metadata=self.connection.metadata())
        except grpc.RpcError as exc:
            raise _from_rpc(exc, self.connection) from None
        return Prediction.from_proto(response)

    def detect_stream(self, items: Iterable[tuple[str, Image]],
                      score_threshold: float | None = None, timeout: float | None = None,
                      window: int | None = None, embeddings: str = "none",
                      pixel_metadata: bool = False, class_probabilities: bool = False
                      ) -> Iterator[Prediction]:
        """(id, image) pairs in, predictions out as they finish (any order).

        ``window`` bounds the requests in flight; items are read lazily.
        """
        slots = threading.Semaphore(window) if window else None

        def requests() -> Iterator[pb.DetectRequest]:
            for item_id, data in items:
                if slots is not None:
                    slots.acquire()
                yield _request(item_id, data, score_threshold, embeddings, pixel_metadata,
                               class_probabilities)

        try:
            for response in self._stub.DetectStream(requests(), timeout=timeout,
                                                    metadata=self.connection.metadata()):
                if slots is not None:
                    slots.release()
                yield Prediction.from_proto(response)
        except grpc.RpcError as exc:
            raise _from_rpc(exc, self.connection) from None

    def model_info(self, timeout: float | None = 10.0) -> pb.ModelInfoResponse:
        try:
            return self._stub.ModelInfo(pb.ModelInfoRequest(), timeout=timeout,
                                        metadata=self.connection.metadata())
        except grpc.RpcError as exc:
            raise _from_rpc(exc, self.connection) from None

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncClient:
    """asyncio client with the same methods as :class:`Client`."""

    def __init__(self, address: str | Connection, **kwargs: Any) -> None:
        self.connection = address if isinstance(address, Connection) else Connection(
            address, **kwargs)
        c = self.connection
        creds = c.credentials()
        self._channel = (grpc.aio.secure_channel(c.address, creds, c.options()) if creds
                         else grpc.aio.insecure_channel(c.address, c.options()))
        self._stub = pb_grpc.PretaggerStub(self._channel)

    async def detect(self, image: Image, id: str = "", score_threshold: float | None = None,
                     timeout: float | None = None, embeddings: str = "none",
                     pixel_metadata: bool = False, class_probabilities: bool = False
                     ) -> Prediction:
        try:
            response = await self._stub.Detect(_request(id, image, score_threshold, embeddings,
                                                        pixel_metadata, class_probabilities),
                                               timeout=timeout,
                                               metadata=self.connection.metadata())
        except grpc.RpcError as exc:
            raise _from_rpc(exc, self.connection) from None
        return Prediction.from_proto(response)

    async def detect_stream(self, items: AsyncIterable[tuple[str, Image]],
                            score_threshold: float | None = None,
                            timeout: float | None = None,
                            window: int | None = None,
                            embeddings: str = "none",
                            pixel_metadata: bool = False, class_probabilities: bool = False
                            ) -> AsyncIterator[Prediction]:
        """(id, image) pairs in, predictions out as they finish; ``window`` bounds in-flight."""
        slots = asyncio.Semaphore(window) if window else None

        async def requests() -> AsyncIterator[pb.DetectRequest]:
            async for item_id, data in items:
                if slots is not None:
                    await slots.acquire()
                yield _request(item_id, data, score_threshold, embeddings, pixel_metadata,
                               class_probabilities)

        call = self._stub.DetectStream(requests(), timeout=timeout,
                                       metadata=self.connection.metadata())
        try:
            async for response in call:
                if slots is not None:
                    slots.release()
                yield Prediction.from_proto(response)
        except grpc.RpcError as exc:
            raise _from_rpc(exc, self.connection) from None

    async def model_info(self, timeout: float | None = 10.0) -> pb.ModelInfoResponse:
        try:
            return await self._stub.ModelInfo(pb.ModelInfoRequest(), timeout=timeout,
                                              metadata=self.connection.metadata())
        except grpc.RpcError as exc:
            raise _from_rpc(exc, self.connection) from None

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
