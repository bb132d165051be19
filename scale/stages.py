"""The stages of the Ray Data pipeline, as plain functions over column batches.

Each batch is a dict of equal-length numpy columns (Ray Data's ``numpy`` batch format),
so every stage runs, and is tested, without Ray:

    rows    index, name, path                   from the driver's listing (resume done)
    read    + image, code, reason                CPU tasks: read bytes, decode, resize
    detect  + boxes, scores, label_ids, ...      actors: one ONNX Runtime session each
    write   index, name, entry, code, reason     CPU tasks: prediction files, vector shard

An image that fails a stage keeps going with ``code`` set (as in errors.jsonl) and is
passed over by the stages after it. The answers go through the server's own functions
(:func:`~pretag.server.engine.to_result`) and are written with the client's, so the
files are those the gRPC path writes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pretag.contract import ResizeSpec
from pretag.job.errors import Code
from pretag.job.outputs import Detections, make_entry, write_prediction
from pretag.job.storage import DEFAULT_TIMEOUT_S, location, storage_outage
from pretag.job.stream import write_failure
from pretag.job.vectors import Shard, embeddings_dir, write_shard
from pretag.preprocess import (
    DEFAULT_DECODE_MEMORY_MB,
    DecodeBudget,
    ImageError,
    canvas_size,
    pad_batch,
    prepare,
)
from pretag.runtime.backend import BackendConfig, OrtBackend
from pretag.runtime.detections import BatchInfo, Raw, request_message, split_outputs, to_result

log = logging.getLogger(__name__)

Batch = dict[str, np.ndarray]
#: ``code`` of a failure that every later image would meet too (a full disk): the
#: driver stops the job with its reason.
STOP = Code.STOP
_EMPTY = np.zeros((0, 0, 3), np.uint8)
#: Decodes at once in one worker process stay under the server's default budget.
_BUDGET = DecodeBudget(DEFAULT_DECODE_MEMORY_MB * 2**20)


def _column(values: list[Any]) -> np.ndarray:
    """A column of per-row values; arrays of different shapes stay one object each."""
    out = np.empty(len(values), dtype=object)
    out[:] = values
    return out


def _read_one(path: str, name: str, resize: ResizeSpec, max_pixels: int, timeout_s: float
              ) -> tuple[np.ndarray, tuple[int, int], str, str]:
    try:
        data = location(path, timeout_s).read_bytes()
    except Exception as exc:
        problem = storage_outage(exc)
        if problem is not None:  # the store, not this image: the driver stops the job
            return _EMPTY, (0, 0), STOP, f"cannot read {path}: {problem}"
        if not isinstance(exc, OSError):
            raise
        return _EMPTY, (0, 0), Code.READ, f"cannot read file: {exc.strerror or exc}"
    try:  # the server's own step, under a decode budget of the same default size
        image, original = prepare(data, resize, max_pixels, _BUDGET)
    except ImageError as exc:  # what the server answers for the same bytes
        return _EMPTY, (0, 0), Code.INVALID_ARGUMENT, request_message(name, str(exc))
    return image, original, "", ""


def read_images(batch: Batch, resize: ResizeSpec, max_pixels: int,
                timeout_s: float = DEFAULT_TIMEOUT_S) -> Batch:
    """Read, decode and resize each row's image (BGR, as the server's engine does)."""
    read = [_read_one(str(p), str(n), resize, max_pixels, timeout_s)
            for p, n in zip(batch["path"], batch["name"], strict=True)]
    return {**batch,
            "image": _column([r[0] for r in read]),
            "original": np.array([r[1] for r in read], np.int64).reshape(-1, 2),
            "code": np.array([r[2] for r in read], dtype=object),
            "reason": np.array([r[3] for r in read], dtype=object)}


@dataclass(frozen=True)
class DetectorConfig:
    """What each detector actor is built with (its model comes as bytes)."""

    threshold: float
    batch_size: int
    backend: BackendConfig = field(default_factory=BackendConfig)  # threads None: all cores


def model_file(model: bytes, folder: Path | None = None) -> Path:
    """The model's bytes as ``<folder>/<sha256>.onnx`` (default: the node's temporary
    folder, ``pretag-models/``): written once per node and content, atomically, so actors
    that restart or share a node load the same file (and an engine cache keyed by it, such
    as TensorRT's, can survive restarts)."""
    folder = folder or Path(tempfile.gettempdir()) / "pretag-models"
    path = folder / f"{hashlib.sha256(model).hexdigest()}.onnx"
    if not path.is_file() or path.stat().st_size != len(model):
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".{path.name}.{os.getpid()}.tmp"
        tmp.write_bytes(model)
        os.replace(tmp, path)
    return path


class Detector:
    """One ONNX Runtime session; detects every decoded image of a batch, in model
    batches of at most ``batch_size`` images that share a canvas (as the server's
    batcher groups them)."""

    def __init__(self, model: bytes, config: DetectorConfig) -> None:
        self.backend = OrtBackend(model_file(model), config.backend)
        self.spec = self.backend.spec
        self.config = config
        # the threshold travels as a float32 in a DetectRequest: compare with the same value
        self.threshold = float(np.float32(config.threshold))

    def __call__(self, batch: Batch) -> Batch:
        groups: dict[tuple[int, int], list[int]] = defaultdict(list)
        for i, code in enumerate(batch["code"]):
            if not code:
                groups[canvas_size([batch["image"][i].shape[:2]], self.spec.resize)].append(i)
        raws: dict[int, Raw] = {}
        size = self.config.batch_size
        for rows in groups.values():
            for start in range(0, len(rows), size):
                chunk = rows[start:start + size]
                images = [batch["image"][i] for i in chunk]
                out = self.backend.run(pad_batch(images, self.spec.resize, bgr=True))
                raws.update(zip(chunk, split_outputs(out, [im.shape[:2] for im in images]),
                                strict=True))
        return {key: value for key, value in batch.items() if key != "image"} | \
            self._columns(batch, raws)

    def _columns(self, batch: Batch, raws: dict[int, Raw]) -> Batch:
        info = BatchInfo(0.0, 0.0, 0)
        results = {i: to_result(raw, tuple(batch["original"][i]), info, self.threshold,
                                self.spec.class_names) for i, raw in raws.items()}
        rows = range(len(batch["name"]))
        none = np.zeros((0,), np.float32)
        return {
            "boxes": _column([results[i].boxes if i in results else none.reshape(0, 4)
                              for i in rows]),
            "scores": _column([results[i].scores if i in results else none for i in rows]),
            "label_ids": _column([results[i].label_ids if i in results
                                  else np.zeros((0,), np.int64) for i in rows]),
            "embedding": _column([_or_empty(results[i].embedding) if i in results else none
                                  for i in rows]),
            "objects": _column([_or_empty(results[i].object_embeddings) if i in results
                                else none for i in rows]),
        }


def _or_empty(values: np.ndarray | None) -> np.ndarray:
    return np.zeros((0,), np.float32) if values is None else values


@dataclass(frozen=True)
class WriteConfig:
    """Where and what the write stage writes."""

    output_dir: str  # a local path or an object-storage URL
    class_names: tuple[str, ...]
    mode: str  # vectors: none|image|objects|all
    first_shard: int  # the block's shard number: this plus its first image's index
    object_dim: int = 0  # the model's object vector size (mode objects or all)
    timeout_s: float = DEFAULT_TIMEOUT_S  # per object-storage request


def _prediction(batch: Batch, i: int, class_names: tuple[str, ...]) -> Detections:
    embedding = np.asarray(batch["embedding"][i], np.float32)
    objects = np.asarray(batch["objects"][i], np.float32)
    return Detections(str(batch["name"][i]),
                      [tuple(box) for box in np.asarray(batch["boxes"][i]).tolist()],
                      [class_names[j] for j in np.asarray(batch["label_ids"][i]).tolist()],
                      np.asarray(batch["scores"][i]).tolist(),
                      embedding=embedding if embedding.size else None,
                      object_embeddings=objects if objects.size else None)


def write_block(batch: Batch, config: WriteConfig) -> Batch:
    """Each image's prediction file, then the block's vector shard (which marks its
    images done); returns what the driver records: entry JSON, or code and reason."""
    output_dir = location(config.output_dir, config.timeout_s)
    images, objects = config.mode in ("image", "all"), config.mode in ("objects", "all")
    shard = Shard(config.first_shard + int(min(batch["index"], default=0)), config.object_dim)
    codes, reasons = list(batch["code"]), list(batch["reason"])
    entries = [""] * len(codes)
    for i, code in enumerate(codes):
        if code:
            continue
        pred = _prediction(batch, i, config.class_names)
        entry = make_entry(pred.id, pred.boxes, pred.labels, pred.scores)
        try:  # as the gRPC path: vectors checked, prediction stored, then vectors kept
            if config.mode != "none":
                shard.check(pred.id, pred, images, objects)
            write_prediction(output_dir, entry)
        except ValueError as exc:
            codes[i], reasons[i] = Code.VECTORS, str(exc)
            continue
        except Exception as exc:
            fatal, reasons[i] = write_failure(exc, output_dir)
            codes[i] = STOP if fatal else Code.WRITE
            continue
        if config.mode != "none":
            shard.add(pred.id, pred, images, objects)
        entries[i] = json.dumps(entry)
    if shard.names:
        try:
            write_shard(embeddings_dir(output_dir), shard, images, objects)
        except Exception as exc:
            problem = storage_outage(exc)
            if problem is None and not isinstance(exc, (OSError, ValueError)):
                raise
            codes = [STOP] * len(codes)
            reasons = [f"cannot write vectors to {embeddings_dir(output_dir)}: "
                       f"{problem or exc}"] * len(codes)
    return {"index": batch["index"], "name": batch["name"],
            "entry": np.array(entries, dtype=object), "code": np.array(codes, dtype=object),
            "reason": np.array(reasons, dtype=object)}
