"""The pretag.v1.Pretagger servicer: Detect, DetectStream, ModelInfo."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Sequence

import grpc
import numpy as np

from pretag.contract import ModelSpec
from pretag.preprocess import Pixels
from pretag.server.config import BatchingConfig
from pretag.server.engine import Engine, Result
from pretag.server.errors import InvalidInput, ServeError, Unsupported, describe, grpc_code
from pretag.server.rpc import answer_concurrently, deadline_of, guarded_detect
from pretag.v1 import pretag_pb2 as pb
from pretag.v1 import pretag_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)


_IMAGE = (pb.EMBEDDINGS_IMAGE, pb.EMBEDDINGS_ALL)
_OBJECTS = (pb.EMBEDDINGS_OBJECTS, pb.EMBEDDINGS_ALL)


def payload(request: pb.DetectRequest) -> bytes | Pixels:
    """The request's encoded image, or its raw pixels as an array (InvalidInput when their
    size and shape disagree)."""
    if request.WhichOneof("input") != "raw":
        return request.image
    raw = request.raw
    expected = raw.height * raw.width * 3
    if len(raw.pixels) != expected:
        raise InvalidInput(f"raw pixels: {len(raw.pixels)} bytes for {raw.width}x{raw.height}"
                           f"x3 = {expected}")
    image: np.ndarray = np.frombuffer(raw.pixels, np.uint8).reshape(raw.height, raw.width, 3)
    if raw.format == pb.PIXEL_FORMAT_RGB24:
        image = image[:, :, ::-1]
    original = ((raw.original_height, raw.original_width)
                if raw.original_height and raw.original_width else None)
    return Pixels(image, original)


def model_info(spec: ModelSpec, providers: Sequence[str], batching: BatchingConfig,
               default_score_threshold: float, max_message_bytes: int = 0
               ) -> pb.ModelInfoResponse:
    """What a model run this way is, as ModelInfo answers it (also what the Ray executor
    gives the shared job, so both executors record the same run settings)."""
    return pb.ModelInfoResponse(
        name=spec.name, class_names=list(spec.class_names),
        contract_version=spec.contract_version, providers=list(providers),
        batching=pb.BatchingConfig(max_batch_size=batching.max_batch_size,
                                   max_queue_delay_ms=batching.max_queue_delay_ms,
                                   max_queue=batching.max_queue, instances=batching.instances),
        default_score_threshold=default_score_threshold,
        resize_json=spec.resize.to_json(), source_weights=spec.source_weights,
        source_sha256=spec.source_sha256, precision=spec.precision,
        max_message_bytes=max_message_bytes, min_score_threshold=spec.score_threshold,
        embedding_dim=spec.embedding_dim or 0,
        object_embedding_dim=spec.object_embedding_dim or 0,
        class_probabilities=bool(spec.class_probability_method),
        class_probability_method=spec.class_probability_method)


def check_embeddings(engine: Engine, request: pb.DetectRequest) -> None:
    """Refuse vectors (or class probabilities) the model does not give, before any work is
    done."""
    spec = engine.spec
    if request.embeddings in _IMAGE and spec.embedding_dim is None:
        raise Unsupported(f"model {spec.name} gives no image embeddings")
    if request.embeddings in _OBJECTS and spec.object_embedding_dim is None:
        raise Unsupported(f"model {spec.name} gives no object embeddings")
    if request.class_probabilities and not spec.class_probability_method:
        raise Unsupported(f"model {spec.name} gives no class probabilities (export it again "
                          f"with this pretag)")


def to_response(request: pb.DetectRequest, result: Result) -> pb.DetectResponse:
    objects = result.object_embeddings if request.embeddings in _OBJECTS else None
    probabilities = result.class_probabilities if request.class_probabilities else None
    detections = [
        pb.Detection(x1=float(b[0]), y1=float(b[1]), x2=float(b[2]), y2=float(b[3]),
                     label=label, score=float(s),
                     embedding=None if objects is None else objects[i].tolist(),
                     class_probabilities=None if probabilities is None
                     else probabilities[i].tolist())
        for i, (b, label, s) in enumerate(zip(result.boxes, result.labels, result.scores,
                                              strict=True))
    ]
    info = result.info
    response = pb.DetectResponse(
        id=request.id, detections=detections, width=result.width, height=result.height,
        timing=pb.Timing(queue_ms=info.queue_s * 1000, compute_ms=info.compute_s * 1000,
                         batch_size=info.batch_size))
    if request.embeddings in _IMAGE and result.embedding is not None:
        response.embedding.extend(result.embedding.tolist())
    if result.metadata is not None:
        m = result.metadata
        response.pixel_metadata.CopyFrom(pb.PixelMetadata(
            uniform_row_ratio=m["uniformRowRatio"], sharpness=m["sharpness"],
            contrast=m["contrast"], mean_red=m["meanRed"], mean_green=m["meanGreen"],
            mean_blue=m["meanBlue"]))
    return response


def error_response(request_id: str, exc: BaseException) -> pb.DetectResponse:
    code = grpc_code(exc)
    return pb.DetectResponse(id=request_id, status=pb.Status(
        code=code.value[0], message=describe(exc, request_id)))


def _threshold(request: pb.DetectRequest) -> float | None:
    return request.score_threshold if request.HasField("score_threshold") else None


class PretaggerService(pb_grpc.PretaggerServicer):
    def __init__(self, engine: Engine, max_message_bytes: int = 0) -> None:
        self.engine = engine
        self.max_message_bytes = max_message_bytes

    async def Detect(self, request: pb.DetectRequest,
                     context: grpc.aio.ServicerContext) -> pb.DetectResponse:
        try:
            check_embeddings(self.engine, request)
            result = await guarded_detect(self.engine, "Detect", request.id,
                                          payload(request), _threshold(request),
                                          deadline_of(context),
                                          pixel_metadata=request.pixel_metadata)
        except ServeError as exc:
            await context.abort(grpc_code(exc), describe(exc, request.id))
        return to_response(request, result)

    async def DetectStream(self, request_iterator: AsyncIterator[pb.DetectRequest],
                           context: grpc.aio.ServicerContext
                           ) -> AsyncIterator[pb.DetectResponse]:
        """Answer items as they finish; each failure is reported in its own response.

        When the server starts draining, the stream reads no more requests and ends
        once what it read is answered, so a client moves on without waiting for --grace-s.
        """
        deadline = deadline_of(context)

        async def one(request: pb.DetectRequest) -> pb.DetectResponse:
            try:
                check_embeddings(self.engine, request)
                result = await guarded_detect(self.engine, "DetectStream", request.id,
                                              payload(request), _threshold(request), deadline,
                                              pixel_metadata=request.pixel_metadata)
            except ServeError as exc:
                return error_response(request.id, exc)
            return to_response(request, result)

        async for response in answer_concurrently(request_iterator, one, self.engine.stopping):
            yield response
        if self.engine.draining:
            await context.abort(grpc.StatusCode.UNAVAILABLE,
                                "server is draining; send the rest elsewhere")

    async def ModelInfo(self, request: pb.ModelInfoRequest,
                        context: grpc.aio.ServicerContext) -> pb.ModelInfoResponse:
        engine = self.engine
        return model_info(engine.spec, engine.backend.providers, engine.config.batching,
                          engine.score_threshold, self.max_message_bytes)
