"""Model backends behind one narrow interface, so each layer above can be faked.

A backend runs one padded :class:`~pretag.preprocess.Batch` through a contract
model and returns its raw outputs. :class:`OrtBackend` does this with ONNX
Runtime: ``instances`` sessions so batches overlap, thread counts that split the
cores between them, providers chosen from what is installed.
"""

from __future__ import annotations

import logging
import os
import queue
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from pretag.contract import ContractError, ModelSpec, validate_session
from pretag.preprocess import Batch

log = logging.getLogger(__name__)

#: Images per model call unless told otherwise (the server's --max-batch-size).
DEFAULT_MAX_BATCH_SIZE = 8

DEFAULT_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider",
                     "CPUExecutionProvider")
PROVIDER_ALIASES = {"tensorrt": "TensorrtExecutionProvider", "trt": "TensorrtExecutionProvider",
                    "cuda": "CUDAExecutionProvider", "cpu": "CPUExecutionProvider"}


@dataclass(frozen=True)
class Outputs:
    """The contract outputs of one batch."""

    boxes: np.ndarray  # float32 [N, K, 4], input pixels
    scores: np.ndarray  # float32 [N, K]
    labels: np.ndarray  # int64 [N, K]
    num_detections: np.ndarray  # int64 [N]
    embeddings: np.ndarray | None = None  # float32 [N, D]
    object_embeddings: np.ndarray | None = None  # float32 [N, K, E]
    class_probabilities: np.ndarray | None = None  # float32 [N, K, C]


class Backend(Protocol):
    """What the server needs from a model."""

    spec: ModelSpec
    providers: tuple[str, ...]

    def run(self, batch: Batch) -> Outputs:
        """Run one batch; must be safe to call from ``instances`` threads at once."""
        ...


class BackendError(RuntimeError):
    """The model cannot be loaded or run as configured."""


@dataclass(frozen=True)
class BackendConfig:
    """How ONNX Runtime sessions are made; the server, the Ray actors and the benchmarks
    each nest one. ``provider_options`` is keyed by provider (full name or alias, e.g.
    ``{"tensorrt": {"trt_engine_cache_enable": "True"}}``) and handed to ONNX Runtime as is;
    options for a provider the session does not use are refused."""

    providers: tuple[str, ...] | None = None  # None: TensorRT, CUDA, CPU as installed
    threads: int | None = None  # intra-op threads per session; None: the cores split
    provider_options: Mapping[str, Mapping[str, str]] = field(default_factory=dict)

    def problem(self) -> str | None:
        """What is wrong with these settings, or None."""
        if self.threads is not None and self.threads < 1:
            return "threads must be at least 1"
        return None

    def options_for(self, names: Sequence[str]) -> list[dict[str, str]]:
        """ONNX Runtime's provider_options list for the providers ``names``."""
        given = {PROVIDER_ALIASES.get(k.lower(), k): dict(v)
                 for k, v in self.provider_options.items()}
        unused = sorted(given.keys() - set(names))
        if unused:
            raise BackendError(f"provider options for {', '.join(unused)}, which this session "
                               f"does not use (its providers: {', '.join(names)})")
        return [{k: str(v) for k, v in given.get(n, {}).items()} for n in names]


def parse_provider_options(texts: Iterable[str]) -> dict[str, dict[str, str]]:
    """``PROVIDER:KEY=VALUE`` flags (e.g. ``tensorrt:trt_fp16_enable=True``) as
    :attr:`BackendConfig.provider_options`."""
    out: dict[str, dict[str, str]] = {}
    for text in texts:
        provider, colon, rest = text.partition(":")
        key, equals, value = rest.partition("=")
        if not (provider and colon and key and equals):
            raise BackendError(f"provider option {text!r}: expected PROVIDER:KEY=VALUE, e.g. "
                               f"tensorrt:trt_engine_cache_enable=True")
        out.setdefault(provider, {})[key] = value
    return out


#: ``--instances auto``: a model file up to this size counts as small (YOLOX-Nano is 3.7 MB,
#: Faster R-CNN R50-FPN 167 MB).
SMALL_MODEL_BYTES = 64 * 2**20
#: ``--instances auto`` runs at most this many sessions: each needs a batch of its own
#: queued to be busy, and each holds its own weights and activation arena.
MAX_AUTO_INSTANCES = 8


def session_layout(model: Path, providers: Sequence[str], cores: int,
                   threads: int | None = None) -> tuple[int, int]:
    """(sessions, intra-op threads per session) for ``--instances auto``.

    Measured with ``pretag bench server`` and ``pretag run`` (benchmarks/RESULTS.md): a
    small model's convolutions are too small to split well over threads, so on the CPU
    single-thread sessions side by side beat one session on every core (YOLOX-Nano 416 on
    2 cores: 2 x 1 against 1 x 2, 1.2x); a large model's kernels split well, so it gets
    sessions of up to 4 threads. An accelerator gets one session: the batcher keeps it
    fed. ``threads`` given: as many sessions of that many threads as the cores hold.
    """
    cores = max(1, cores)
    if any(p != "CPUExecutionProvider" for p in providers):
        return 1, threads or cores
    if threads is None:
        threads = 1 if model.stat().st_size <= SMALL_MODEL_BYTES else min(cores, 4)
        instances = min(MAX_AUTO_INSTANCES, max(1, cores // threads))
        return instances, max(1, cores // instances)
    return min(MAX_AUTO_INSTANCES, max(1, cores // threads)), threads


def resolve_providers(requested: Sequence[str] | None, available: Sequence[str]) -> list[str]:
    """Providers to ask ONNX Runtime for, in order.

    None means the default order (TensorRT, CUDA, CPU) restricted to those installed.
    Explicit names (or the aliases cpu, cuda, tensorrt) must all be installed.
    """
    if not requested:
        return [p for p in DEFAULT_PROVIDERS if p in available] or ["CPUExecutionProvider"]
    names = [PROVIDER_ALIASES.get(p.lower(), p) for p in requested]
    missing = [n for n in names if n not in available]
    if missing:
        raise BackendError(f"execution providers {missing} are not available in this "
                           f"onnxruntime (it has {list(available)}); for CUDA/TensorRT "
                           f"install pretag[gpu]")
    return names


def check_started(requested: Sequence[str], started: Sequence[str], explicit: bool) -> None:
    """Catch ONNX Runtime's silent fall-back to other providers when one fails to start.

    Explicitly requested providers must all have started (BackendError otherwise). For
    the default order, ending on the CPU when an accelerator was tried is logged as a
    warning: ONNX Runtime may fall back from TensorRT straight to the CPU, skipping
    CUDA (microsoft/onnxruntime#27006).
    """
    missing = [p for p in requested if p not in started]
    if not missing:
        return
    if explicit:
        raise BackendError(f"execution providers {missing} did not start (ONNX Runtime "
                           f"fell back to {list(started)}; its log above says why)")
    if all(p == "CPUExecutionProvider" for p in started):
        log.warning("%s did not start and the model runs on the CPU; ONNX Runtime's log above "
                    "says why. To use CUDA without TensorRT pass --providers cuda", missing)


class OrtBackend:
    """A contract model on ONNX Runtime, with a pool of ``instances`` sessions."""

    def __init__(self, model: str | Path, config: BackendConfig | None = None, *,
                 instances: int = 1) -> None:
        import onnxruntime as ort

        config = config or BackendConfig()
        if config.problem():
            raise BackendError(str(config.problem()))
        path = Path(model)
        if not path.is_file():
            raise BackendError(f"model file {path} does not exist")
        names = resolve_providers(config.providers, ort.get_available_providers())
        provider_options = config.options_for(names)
        cores = os.cpu_count() or 1
        intra = config.threads or max(1, cores // max(1, instances))
        self._pool: queue.SimpleQueue[ort.InferenceSession] = queue.SimpleQueue()
        sessions = []
        for _ in range(instances):
            options = ort.SessionOptions()
            options.intra_op_num_threads = intra
            options.inter_op_num_threads = 1
            try:
                session = ort.InferenceSession(str(path), options, providers=names,
                                               provider_options=provider_options)
            except Exception as exc:  # ORT raises several private exception types
                raise BackendError(f"ONNX Runtime cannot load {path}: {exc}") from exc
            sessions.append(session)
            self._pool.put(session)
        try:
            self.spec = validate_session(sessions[0])
        except ContractError as exc:
            raise BackendError(str(exc)) from exc
        self.providers = tuple(sessions[0].get_providers())
        check_started(names, self.providers, explicit=bool(config.providers))
        self._outputs = [o.name for o in sessions[0].get_outputs()]
        log.info("loaded %s (%s) on %s, %d instance(s) x %d threads", path.name,
                 self.spec.name, ", ".join(self.providers), instances, intra)

    def run(self, batch: Batch) -> Outputs:
        session = self._pool.get()
        try:
            values = session.run(self._outputs, {"images": batch.images,
                                                 "image_sizes": batch.image_sizes})
        finally:
            self._pool.put(session)
        out = dict(zip(self._outputs, values, strict=True))
        return Outputs(out["boxes"], out["scores"], out["labels"], out["num_detections"],
                       out.get("embeddings"), out.get("object_embeddings"),
                       out.get("class_probabilities"))
