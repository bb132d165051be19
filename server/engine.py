"""The inference pipeline, free of gRPC: decode -> batch -> model -> detections.

Decoding and resizing run in a thread pool and overlap with inference; the
model runs in another pool with one thread per instance. The protocol
servicers (Pretagger, KServe v2) are thin layers over :meth:`Engine.detect`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from pretag import health
from pretag.contract import threshold_problem
from pretag.preprocess import (
    DecodeBudget,
    ImageError,
    Pixels,
    canvas_size,
    pad_batch,
    prepare_inspected,
    prepare_pixels,
    resize_image,
)
from pretag.runtime.backend import Backend
from pretag.runtime.detections import BatchInfo, Raw, Result, split_outputs, to_result
from pretag.server.batcher import DynamicBatcher
from pretag.server.config import EngineConfig
from pretag.server.errors import InvalidInput, QueueFull, Unavailable
from pretag.server.metrics import Metrics

log = logging.getLogger(__name__)


@dataclass
class Reservation:
    """Places in the queue taken for one request's images (see :meth:`Engine.reserve`)."""

    left: int


@dataclass(frozen=True)
class Prepared:
    image: np.ndarray  # resized BGR [h, w, 3]; pad_batch flips it to RGB
    original: tuple[int, int]  # (height, width) before resizing
    metadata: dict[str, float] | None = None  # pixel metadata, when asked for


class Engine:
    """Owns the thread pools, the batcher and the backend; serves :meth:`detect`."""

    def __init__(self, backend: Backend, config: EngineConfig | None = None,
                 metrics: Metrics | None = None) -> None:
        self.backend = backend
        self.spec = backend.spec
        self.config = config or EngineConfig()
        self.metrics = metrics
        cfg = self.config
        self.score_threshold = (self.spec.score_threshold if cfg.score_threshold is None
                                else cfg.score_threshold)
        self._decode_pool = ThreadPoolExecutor(cfg.decode_threads or os.cpu_count() or 1,
                                               thread_name_prefix="pretag-decode")
        batching = cfg.batching
        self._compute_pool = ThreadPoolExecutor(batching.instances,
                                                thread_name_prefix="pretag-model")
        # the engine alone admits work (see _admit), so the batcher's queue has no bound
        self._batcher: DynamicBatcher[Prepared, Raw] = DynamicBatcher(
            self._run_batch, max_batch_size=batching.max_batch_size,
            max_delay_s=batching.max_queue_delay_ms / 1000, instances=batching.instances,
            on_batch=metrics.observe_batch if metrics else None)
        self.decode_budget = DecodeBudget(cfg.decode_memory_mb * 1024 * 1024)
        self._decoding = 0
        self._reserved = 0
        self.ready = False
        self.draining = False
        self.stopping = asyncio.Event()  # set when draining starts: streams read no more

    @property
    def accepting(self) -> bool:
        """Warmed up and not draining: new images are taken."""
        return self.ready and not self.draining

    @property
    def pending(self) -> int:
        """Requests accepted and not yet handed to the model."""
        return self._reserved + self._decoding + self._batcher.queued

    async def start(self) -> None:
        """Warm up every batch size (unless disabled), then report ready."""
        if self.config.warmup:
            start = time.monotonic()
            loop = asyncio.get_running_loop()
            for size in range(1, self.config.batching.max_batch_size + 1):
                await loop.run_in_executor(self._compute_pool, self._warm, size)
            log.info("warm-up of batch sizes 1..%d took %.1f s",
                     self.config.batching.max_batch_size,
                     time.monotonic() - start)
        self._batcher.start()
        self.ready = True

    def _warm(self, size: int) -> None:
        image = resize_image(np.full((480, 640, 3), 114, np.uint8), self.spec.resize)
        self.backend.run(pad_batch([image] * size, self.spec.resize))

    async def close(self) -> None:
        """Refuse new work, finish what was accepted, release the pools."""
        self.draining = True
        self.stopping.set()
        while self._decoding:  # admitted images still decoding go to the batcher first
            await asyncio.sleep(0.005)
        await self._batcher.close()
        self._decode_pool.shutdown(wait=True)
        self._compute_pool.shutdown(wait=True)

    def _admit(self, count: int) -> None:
        """Raise unless ``count`` more images can be taken now."""
        if not self.accepting:
            raise Unavailable("server is draining" if self.draining else "server is warming up")
        max_queue = self.config.batching.max_queue
        if count > max_queue:
            raise InvalidInput(f"{count} images in one request; this server queues at most "
                               f"{max_queue} (--max-queue): send fewer at a time")
        if self.pending + count > max_queue:
            raise QueueFull(f"queue is full ({self.pending} of {max_queue} waiting); "
                            f"retry later")

    def reserve(self, count: int) -> Reservation:
        """Admit a request of ``count`` images as a whole, or refuse it as a whole.

        Its images pass the reservation to :meth:`detect`; :meth:`release` gives
        back the places not used.
        """
        self._admit(count)
        self._reserved += count
        return Reservation(count)

    def release(self, reservation: Reservation) -> None:
        self._reserved -= reservation.left
        reservation.left = 0

    async def detect(self, data: bytes | Pixels, score_threshold: float | None = None,
                     deadline: float | None = None,
                     reservation: Reservation | None = None,
                     pixel_metadata: bool = False) -> Result:
        """Detections for one encoded image (or decoded pixels), with its pixel metadata
        when asked for (:mod:`pretag.health`). Raises :class:`ServeError` subclasses."""
        if reservation is None:
            self._admit(1)
        elif reservation.left > 0:
            reservation.left -= 1
            self._reserved -= 1
        else:
            raise RuntimeError("more images than the reservation was made for")
        self._decoding += 1
        try:
            threshold = self.score_threshold if score_threshold is None else score_threshold
            problem = threshold_problem(threshold)
            if problem:
                raise InvalidInput(problem)
            prepared = await asyncio.get_running_loop().run_in_executor(
                self._decode_pool, self._prepare, data, pixel_metadata)
        finally:
            self._decoding -= 1
        key = canvas_size([prepared.image.shape[:2]], self.spec.resize)
        raw, info = await self._batcher.submit(prepared, key, deadline)
        return self._finish(raw, prepared, info, threshold)

    def _prepare(self, data: bytes | Pixels, metadata: bool = False) -> Prepared:
        try:
            if isinstance(data, Pixels):  # decoded already: nothing to budget
                image, original = prepare_pixels(data, self.spec.resize, self.config.max_pixels)
                return Prepared(image, original, health.pixel_metadata(data.image, original)
                                if metadata else None)
            return Prepared(*prepare_inspected(
                data, self.spec.resize, self.config.max_pixels, self.decode_budget,
                reduced=not self.config.full_decode, metadata=metadata))
        except ImageError as exc:
            raise InvalidInput(str(exc)) from None

    async def _run_batch(self, items: Sequence[Prepared]) -> list[Raw]:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._compute_pool, self._compute, items)

    def _compute(self, items: Sequence[Prepared]) -> list[Raw]:
        batch = pad_batch([p.image for p in items], self.spec.resize, bgr=True)
        return split_outputs(self.backend.run(batch), [p.image.shape[:2] for p in items])

    def _finish(self, raw: Raw, prepared: Prepared, info: BatchInfo,
                threshold: float) -> Result:
        if self.metrics is not None:
            self.metrics.observe_request(info)
        result = to_result(raw, prepared.original, info, threshold, self.spec.class_names)
        if prepared.metadata is not None:
            result = dataclasses.replace(result, metadata=prepared.metadata)
        return result
