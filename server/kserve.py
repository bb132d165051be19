"""KServe v2 / Open Inference Protocol gRPC servicer (``inference.GRPCInferenceService``).

One model, named as in its metadata. Input ``IMAGE``: BYTES [N], each element
one encoded image file. Outputs, as the detector contract but per original
image: ``boxes`` FP32 [N, K, 4] normalised to [0, 1], ``scores`` FP32 [N, K],
``labels`` INT64 [N, K] (class index, -1 for padding), ``num_detections``
INT64 [N]. K is the largest detection count in the request. An optional
request parameter ``score_threshold`` (double) overrides the server default.
Class names are in the ``pretag.v1.Pretagger/ModelInfo`` answer. A request is
admitted as a whole (RESOURCE_EXHAUSTED when the queue cannot take all of its
images now, INVALID_ARGUMENT when it holds more than ``--max-queue`` images).
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import AsyncIterator

import grpc
import numpy as np

import pretag
from pretag.kserve_v2 import grpc_service_pb2 as kpb
from pretag.kserve_v2 import grpc_service_pb2_grpc as kpb_grpc
from pretag.server.engine import Engine, Reservation, Result
from pretag.server.errors import InvalidInput, NotFound, ServeError, describe, grpc_code
from pretag.server.rpc import answer_concurrently, deadline_of, guarded_detect

INPUT = "IMAGE"
VERSION = "1"
OUTPUTS = (("boxes", "FP32", (-1, -1, 4)), ("scores", "FP32", (-1, -1)),
           ("labels", "INT64", (-1, -1)), ("num_detections", "INT64", (-1,)))


def decode_bytes_tensor(raw: bytes) -> list[bytes]:
    """Split Triton's raw BYTES encoding: each element is a uint32 LE length + data."""
    items, pos = [], 0
    while pos < len(raw):
        if pos + 4 > len(raw):
            raise InvalidInput("BYTES tensor is truncated (incomplete length prefix)")
        (size,) = struct.unpack_from("<I", raw, pos)
        pos += 4
        if pos + size > len(raw):
            raise InvalidInput("BYTES tensor is truncated (element longer than the data)")
        items.append(raw[pos:pos + size])
        pos += size
    return items


def request_images(request: kpb.ModelInferRequest) -> list[bytes]:
    """The encoded images of a ModelInfer request (raw or typed contents)."""
    names = [t.name for t in request.inputs]
    if names != [INPUT]:
        raise InvalidInput(f"expected exactly one input {INPUT!r} (BYTES [N]), got {names}")
    tensor = request.inputs[0]
    if tensor.datatype != "BYTES":
        raise InvalidInput(f"input {INPUT!r} must be BYTES, not {tensor.datatype}")
    if request.raw_input_contents:
        images = decode_bytes_tensor(request.raw_input_contents[0])
    else:
        images = list(tensor.contents.bytes_contents)
    count = int(np.prod(tensor.shape)) if tensor.shape else 0
    if count != len(images) or not images:
        raise InvalidInput(f"input {INPUT!r} has shape {list(tensor.shape)} but holds "
                           f"{len(images)} element(s)")
    return images


def _threshold(request: kpb.ModelInferRequest) -> float | None:
    param = request.parameters.get("score_threshold")
    if param is None:
        return None
    choice = param.WhichOneof("parameter_choice")
    if choice not in ("double_param", "int64_param"):
        raise InvalidInput("parameter score_threshold must be a number")
    return float(getattr(param, choice))


def build_response(request: kpb.ModelInferRequest, model: str,
                   results: list[Result]) -> kpb.ModelInferResponse:
    n, k = len(results), max((len(r.scores) for r in results), default=0)
    boxes = np.zeros((n, k, 4), np.float32)
    scores = np.zeros((n, k), np.float32)
    labels = np.full((n, k), -1, np.int64)
    counts = np.zeros((n,), np.int64)
    for i, r in enumerate(results):
        m = len(r.scores)
        boxes[i, :m], scores[i, :m], labels[i, :m], counts[i] = r.boxes, r.scores, r.label_ids, m
    arrays: dict[str, np.ndarray] = {"boxes": boxes, "scores": scores, "labels": labels,
                                     "num_detections": counts}
    wanted = [o.name for o in request.outputs] or list(arrays)
    unknown = [w for w in wanted if w not in arrays]
    if unknown:
        raise InvalidInput(f"unknown outputs {unknown}; this model has {list(arrays)}")
    response = kpb.ModelInferResponse(model_name=model, model_version=VERSION, id=request.id)
    dtypes = {name: dtype for name, dtype, _ in OUTPUTS}
    for name in wanted:
        arr = arrays[name]
        response.outputs.add(name=name, datatype=dtypes[name], shape=list(arr.shape))
        response.raw_output_contents.append(arr.tobytes())
    return response


class KServeService(kpb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.model = engine.spec.name

    def _check_model(self, name: str, version: str = "") -> None:
        if name != self.model:
            raise NotFound(f"model {name!r} is not served here (this server has {self.model!r})")
        if version not in ("", VERSION):
            raise NotFound(f"model {name!r} has no version {version!r} here (only {VERSION!r})")

    async def ServerLive(self, request: kpb.ServerLiveRequest,
                         context: grpc.aio.ServicerContext) -> kpb.ServerLiveResponse:
        return kpb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: kpb.ServerReadyRequest,
                          context: grpc.aio.ServicerContext) -> kpb.ServerReadyResponse:
        return kpb.ServerReadyResponse(ready=self.engine.accepting)

    async def ModelReady(self, request: kpb.ModelReadyRequest,
                         context: grpc.aio.ServicerContext) -> kpb.ModelReadyResponse:
        ready = (request.name == self.model and request.version in ("", VERSION)
                 and self.engine.accepting)
        return kpb.ModelReadyResponse(ready=ready)

    async def ServerMetadata(self, request: kpb.ServerMetadataRequest,
                             context: grpc.aio.ServicerContext) -> kpb.ServerMetadataResponse:
        return kpb.ServerMetadataResponse(name="pretag", version=pretag.__version__)

    async def ModelMetadata(self, request: kpb.ModelMetadataRequest,
                            context: grpc.aio.ServicerContext) -> kpb.ModelMetadataResponse:
        try:
            self._check_model(request.name, request.version)
        except ServeError as exc:
            await context.abort(grpc_code(exc), str(exc))
        response = kpb.ModelMetadataResponse(name=self.model, versions=[VERSION],
                                             platform="onnxruntime_onnx")
        response.inputs.add(name=INPUT, datatype="BYTES", shape=[-1])
        for name, dtype, shape in OUTPUTS:
            response.outputs.add(name=name, datatype=dtype, shape=list(shape))
        return response

    async def _infer(self, request: kpb.ModelInferRequest,
                     context: grpc.aio.ServicerContext) -> kpb.ModelInferResponse:
        """All images of a request are admitted together or refused together (no image
        is computed for a request that cannot finish); the first failure cancels the rest
        and is reported with its element index."""
        self._check_model(request.model_name, request.model_version)
        images = request_images(request)
        threshold, deadline = _threshold(request), deadline_of(context)
        try:
            reservation = self.engine.reserve(len(images))
        except ServeError as exc:
            if self.engine.metrics is not None:
                for _ in images:
                    self.engine.metrics.count("ModelInfer", grpc_code(exc).name)
            raise
        tasks = [asyncio.ensure_future(self._one(request.id, i, len(images), data, threshold,
                                                 deadline, reservation))
                 for i, data in enumerate(images)]
        try:
            results = await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()
            self.engine.release(reservation)
        return build_response(request, self.model, list(results))

    async def _one(self, request_id: str, index: int, count: int, data: bytes,
                   threshold: float | None, deadline: float | None,
                   reservation: Reservation) -> Result:
        try:
            return await guarded_detect(self.engine, "ModelInfer", f"{request_id}[{index}]",
                                        data, threshold, deadline, reservation)
        except ServeError as exc:
            raise type(exc)(f"IMAGE[{index}] (of {count}): {exc}") from exc

    async def ModelInfer(self, request: kpb.ModelInferRequest,
                         context: grpc.aio.ServicerContext) -> kpb.ModelInferResponse:
        try:
            return await self._infer(request, context)
        except ServeError as exc:
            await context.abort(grpc_code(exc), describe(exc, request.id))
            raise  # unreachable: abort raises

    async def ModelStreamInfer(self, request_iterator: AsyncIterator[kpb.ModelInferRequest],
                               context: grpc.aio.ServicerContext
                               ) -> AsyncIterator[kpb.ModelStreamInferResponse]:
        """Triton's streaming extension; failures go in ``error_message``."""
        async def one(request: kpb.ModelInferRequest) -> kpb.ModelStreamInferResponse:
            try:
                response = await self._infer(request, context)
            except ServeError as exc:
                return kpb.ModelStreamInferResponse(
                    error_message=describe(exc, request.id),
                    infer_response=kpb.ModelInferResponse(model_name=self.model, id=request.id))
            return kpb.ModelStreamInferResponse(infer_response=response)

        async for response in answer_concurrently(request_iterator, one, self.engine.stopping):
            yield response
        if self.engine.draining:
            await context.abort(grpc.StatusCode.UNAVAILABLE,
                                "server is draining; send the rest elsewhere")
