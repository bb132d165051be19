"""KServe v2 / Open Inference Protocol gRPC servicer (``inference.GRPCInferenceService``).

One model, named as in its metadata. Input ``IMAGE``: BYTES [N], each element
one encoded image file. Outputs, as the detector contract but per original
image: ``boxes`` FP32 [N, K, 4] normalised to [0, 1], ``scores`` FP32 [N, K],
``labels`` INT64 [N, K] (class index, -1 for padding), ``num_detections``
INT64 [N]. K is the largest detection count in the request. An optional
request parameter ``score_threshold`` (double) overrides the server default.
These four are returned when the request lists no outputs. Listed by name (Triton's
convention), the model's vectors come too: ``embeddings`` FP32 [N, D] and
``object_embeddings`` FP32 [N, K, E] (zeros in padding slots), and, from a model that gives
them, ``class_probabilities`` FP32 [N, K, C] (each detection's distribution over the C
class names; zeros in padding slots). Class names, as Triton's
classification extension gives them: ``labels`` requested with the ``classification``
parameter k (tritonclient's ``InferRequestedOutput("labels", class_count=k)``) comes
back as BYTES [N, min(k, K)] of ``"score:index:name"`` (empty in padding slots). A request is
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
from pretag.contract import ModelSpec
from pretag.kserve_v2 import grpc_service_pb2 as kpb
from pretag.kserve_v2 import grpc_service_pb2_grpc as kpb_grpc
from pretag.server.engine import Engine, Reservation, Result
from pretag.server.errors import InvalidInput, NotFound, ServeError, describe, grpc_code
from pretag.server.rpc import answer_concurrently, deadline_of, guarded_detect

INPUT = "IMAGE"
VERSION = "1"
OUTPUTS = (("boxes", "FP32", (-1, -1, 4)), ("scores", "FP32", (-1, -1)),
           ("labels", "INT64", (-1, -1)), ("num_detections", "INT64", (-1,)))


def vector_outputs(spec: ModelSpec) -> tuple[tuple[str, str, tuple[int, ...]], ...]:
    """The optional outputs this model has: (name, datatype, shape)."""
    out: list[tuple[str, str, tuple[int, ...]]] = []
    if spec.embedding_dim is not None:
        out.append(("embeddings", "FP32", (-1, spec.embedding_dim)))
    if spec.object_embedding_dim is not None:
        out.append(("object_embeddings", "FP32", (-1, -1, spec.object_embedding_dim)))
    if spec.class_probability_method:
        out.append(("class_probabilities", "FP32", (-1, -1, len(spec.class_names))))
    return tuple(out)


def encode_bytes_tensor(items: list[bytes]) -> bytes:
    """Triton's raw BYTES encoding: each element a uint32 LE length, then its bytes."""
    return b"".join(struct.pack("<I", len(item)) + item for item in items)


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


def _classification(spec: ModelSpec, results: list[Result], k: int) -> tuple[bytes, list[int]]:
    """Triton's classification output for ``labels``: "score:index:name" per slot."""
    width = min(k, max((len(r.scores) for r in results), default=0))
    items = []
    for r in results:
        row = [f"{s:.6f}:{i}:{spec.class_names[i]}".encode()
               for s, i in zip(r.scores[:width], r.label_ids[:width], strict=True)]
        items.extend(row + [b""] * (width - len(row)))
    return encode_bytes_tensor(items), [len(results), width]


def _arrays(results: list[Result], wanted: list[str]) -> dict[str, np.ndarray]:
    n, k = len(results), max((len(r.scores) for r in results), default=0)
    arrays: dict[str, np.ndarray] = {"boxes": np.zeros((n, k, 4), np.float32),
                                     "scores": np.zeros((n, k), np.float32),
                                     "labels": np.full((n, k), -1, np.int64),
                                     "num_detections": np.zeros((n,), np.int64)}
    for i, r in enumerate(results):
        m = len(r.scores)
        arrays["boxes"][i, :m], arrays["scores"][i, :m] = r.boxes, r.scores
        arrays["labels"][i, :m], arrays["num_detections"][i] = r.label_ids, m
    if "embeddings" in wanted:
        images = [r.embedding for r in results if r.embedding is not None]
        arrays["embeddings"] = np.stack(images).astype(np.float32)
    for name in ("object_embeddings", "class_probabilities"):
        if name in wanted:
            arrays[name] = _per_detection(results, name, k)
    return arrays


def _per_detection(results: list[Result], name: str, k: int) -> np.ndarray:
    """A per-detection output [N, K, width] (zeros in padding slots)."""
    rows = [getattr(r, name) for r in results]
    width = next((r.shape[1] for r in rows if r is not None), 0)
    out = np.zeros((len(results), k, width), np.float32)
    for i, row in enumerate(rows):
        if row is not None:
            out[i, :len(row)] = row
    return out


def check_outputs(request: kpb.ModelInferRequest, spec: ModelSpec) -> list[str]:
    """The outputs to return (the four detection outputs when none are listed)."""
    known = [name for name, _, _ in OUTPUTS + vector_outputs(spec)]
    wanted = [o.name for o in request.outputs] or [name for name, _, _ in OUTPUTS]
    unknown = [w for w in wanted if w not in known]
    if unknown:
        raise InvalidInput(f"unknown outputs {unknown}; this model has {known}")
    for output in request.outputs:
        if "classification" in output.parameters:
            param = output.parameters["classification"]
            if param.WhichOneof("parameter_choice") != "int64_param" or param.int64_param < 1:
                raise InvalidInput(f"output {output.name!r}: classification (class_count) "
                                   f"must be a positive integer")
    return wanted


def build_response(request: kpb.ModelInferRequest, spec: ModelSpec,
                   results: list[Result]) -> kpb.ModelInferResponse:
    wanted = check_outputs(request, spec)
    arrays = _arrays(results, wanted)
    classify = {o.name: o.parameters["classification"].int64_param for o in request.outputs
                if "classification" in o.parameters}
    response = kpb.ModelInferResponse(model_name=spec.name, model_version=VERSION, id=request.id)
    dtypes = {name: dtype for name, dtype, _ in OUTPUTS + vector_outputs(spec)}
    for name in wanted:
        if name in classify:
            if name != "labels":
                raise InvalidInput(f"classification is offered on 'labels' only, not {name!r}")
            raw, shape = _classification(spec, results, int(classify[name]))
            response.outputs.add(name=name, datatype="BYTES", shape=shape)
            response.raw_output_contents.append(raw)
            continue
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
        for name, dtype, shape in OUTPUTS + vector_outputs(self.engine.spec):
            response.outputs.add(name=name, datatype=dtype, shape=list(shape))
        return response

    async def _infer(self, request: kpb.ModelInferRequest,
                     context: grpc.aio.ServicerContext) -> kpb.ModelInferResponse:
        """All images of a request are admitted together or refused together (no image
        is computed for a request that cannot finish); the first failure cancels the rest
        and is reported with its element index."""
        self._check_model(request.model_name, request.model_version)
        images = request_images(request)
        check_outputs(request, self.engine.spec)  # before any work
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
        return build_response(request, self.engine.spec, list(results))

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
