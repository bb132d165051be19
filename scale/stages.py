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
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pretag import health
from pretag.contract import ResizeSpec
from pretag.job.errors import Code
from pretag.job.health import content_hash
from pretag.job.outputs import Detections, make_entry, write_prediction
from pretag.job.storage import DEFAULT_TIMEOUT_S, location, storage_outage
from pretag.job.stream import write_failure
from pretag.job.vectors import Shard, embeddings_dir, write_shard
from pretag.job.video import FrameReader, Video, VideoError, failure, from_row
from pretag.preprocess import (
    DEFAULT_DECODE_MEMORY_MB,
    DecodeBudget,
    ImageError,
    canvas_size,
    pad_batch,
    prepare_inspected,
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


def _read_one(path: str, name: str, resize: ResizeSpec, max_pixels: int, timeout_s: float,
              pixel_metadata: bool = True
              ) -> tuple[np.ndarray, tuple[int, int], str, str, str, str]:
    """(image, original, code, reason, metadata JSON or "", content hash or "")."""
    try:
        data = location(path, timeout_s).read_bytes()
    except Exception as exc:
        problem = storage_outage(exc)
        if problem is not None:  # the store, not this image: the driver stops the job
            return _EMPTY, (0, 0), STOP, f"cannot read {path}: {problem}", "", ""
        if not isinstance(exc, OSError):
            raise
        return _EMPTY, (0, 0), Code.READ, f"cannot read file: {exc.strerror or exc}", "", ""
    digest = content_hash(data)
    try:  # the server's own step, under a decode budget of the same default size
        image, original, meta = prepare_inspected(data, resize, max_pixels, _BUDGET,
                                                  metadata=pixel_metadata)
    except ImageError as exc:  # what the server answers for the same bytes
        return (_EMPTY, (0, 0), Code.INVALID_ARGUMENT, request_message(name, str(exc)), "",
                digest)
    return image, original, "", "", json.dumps(meta) if meta else "", digest


def read_images(batch: Batch, resize: ResizeSpec, max_pixels: int,
                timeout_s: float = DEFAULT_TIMEOUT_S, pixel_metadata: bool = True) -> Batch:
    """Read, decode and resize each row's image (BGR, as the server's engine does), with
    its pixel metadata and content hash (pretag.job.health)."""
    read = [_read_one(str(p), str(n), resize, max_pixels, timeout_s, pixel_metadata)
            for p, n in zip(batch["path"], batch["name"], strict=True)]
    return {**batch,
            "image": _column([r[0] for r in read]),
            "original": np.array([r[1] for r in read], np.int64).reshape(-1, 2),
            "code": np.array([r[2] for r in read], dtype=object),
            "reason": np.array([r[3] for r in read], dtype=object),
            "metadata": np.array([r[4] for r in read], dtype=object),
            "digest": np.array([r[5] for r in read], dtype=object)}


#: ``code`` of a frame not read because its video failed before it: counted, not listed
#: (the video's own line, code VIDEO, says how many frames were left).
SKIP = "SKIP"


def read_video(batch: Batch, resize: ResizeSpec, frames_per_batch: int,
               timeout_s: float = DEFAULT_TIMEOUT_S, pixel_metadata: bool = True
               ) -> Iterator[Batch]:
    """The frames still to do of each video row (``job.video.to_row`` plus ``indices``,
    ``names``, ``frames``), decoded in order by this one task and given out
    ``frames_per_batch`` at a time, as :func:`read_images` rows. A video that fails gives
    its first frame not read code VIDEO (reason: the errors.jsonl line, as JSON) and the
    others SKIP, as the gRPC path reports it."""
    for row in range(len(batch["path"])):
        values = {key: batch[key][row] for key in batch}
        video = from_row(values, location(str(values["path"]), timeout_s))
        names = dict(zip((int(f) for f in values["frames"]), values["names"], strict=True))
        index_of = dict(zip((int(f) for f in values["frames"]),
                            (int(i) for i in values["indices"]), strict=True))
        out: list[tuple[int, str, np.ndarray, tuple[int, int], str, str]] = []
        reader = FrameReader(video, list(names), resize)
        try:
            for frame, image, original in reader:
                out.append((index_of[frame], names.pop(frame), image, original, "", ""))
                if len(out) == frames_per_batch:
                    yield _frame_rows(out, video, pixel_metadata)
                    out = []
        except VideoError as exc:
            line = json.dumps(failure(video, list(names), exc))
            for k, frame in enumerate(sorted(names)):
                out.append((index_of[frame], names[frame], _EMPTY, (0, 0),
                            Code.VIDEO if k == 0 else SKIP, line if k == 0 else ""))
        except Exception as exc:  # the store, not this video: the driver stops the job
            problem = storage_outage(exc)
            if problem is None:
                raise
            out += [(index_of[frame], names[frame], _EMPTY, (0, 0), STOP,
                     f"cannot read {video.path}: {problem}") for frame in sorted(names)]
        if out:
            yield _frame_rows(out, video, pixel_metadata)


def _frame_metadata(image: np.ndarray, original: tuple[int, int]) -> str:
    return json.dumps(health.pixel_metadata(image, (int(original[0]), int(original[1])))
                      ) if image.size else ""


def _frame_rows(rows: list[tuple[int, str, np.ndarray, tuple[int, int], str, str]],
                video: Video, metadata: bool = True) -> Batch:
    return {"index": np.array([r[0] for r in rows], np.int64),
            "name": np.array([r[1] for r in rows], dtype=object),
            "path": np.array([str(video.path)] * len(rows), dtype=object),
            "image": _column([r[2] for r in rows]),
            "original": np.array([r[3] for r in rows], np.int64).reshape(-1, 2),
            "code": np.array([r[4] for r in rows], dtype=object),
            "reason": np.array([r[5] for r in rows], dtype=object),
            # as the gRPC path: frames' metadata from the pixels sent to the model, no hash
            "metadata": np.array([_frame_metadata(r[2], r[3]) if metadata else ""
                                  for r in rows], dtype=object),
            "digest": np.array([""] * len(rows), dtype=object)}


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
        """Each row's detections and vectors as raw bytes (float32; label ids int64): a
        column of bytes converts to Arrow the same way whatever the rows hold (arrays of
        changing or zero size do not: blocks of only failures or only empty images would
        not join the others)."""
        info = BatchInfo(0.0, 0.0, 0)
        results = {i: to_result(raw, tuple(batch["original"][i]), info, self.threshold,
                                self.spec.class_names) for i, raw in raws.items()}

        def column(get: Any, dtype: Any) -> np.ndarray:
            return _column([b"" if i not in results or get(results[i]) is None
                            else np.ascontiguousarray(get(results[i]), dtype).tobytes()
                            for i in range(len(batch["name"]))])

        return {"boxes": column(lambda r: r.boxes, np.float32),
                "scores": column(lambda r: r.scores, np.float32),
                "label_ids": column(lambda r: r.label_ids, np.int64),
                "embedding": column(lambda r: r.embedding, np.float32),
                "objects": column(lambda r: r.object_embeddings, np.float32),
                "probabilities": column(lambda r: r.class_probabilities, np.float32)}


@dataclass(frozen=True)
class WriteConfig:
    """Where and what the write stage writes."""

    output_dir: str  # a local path or an object-storage URL
    class_names: tuple[str, ...]
    mode: str  # vectors: none|image|objects|all
    first_shard: int  # the block's shard number: this plus its first image's index
    object_dim: int = 0  # the model's object vector size (mode objects or all)
    timeout_s: float = DEFAULT_TIMEOUT_S  # per object-storage request
    probabilities: bool = False  # store each detection's class distribution


def _prediction(batch: Batch, i: int, config: WriteConfig) -> Detections:
    def values(column: str, dtype: Any = np.float32) -> np.ndarray:
        return np.frombuffer(batch[column][i], dtype)

    embedding = values("embedding")
    objects = values("objects").reshape(-1, config.object_dim or 1)
    probabilities = values("probabilities").reshape(-1, len(config.class_names))
    return Detections(str(batch["name"][i]),
                      [tuple(box) for box in values("boxes").reshape(-1, 4).tolist()],
                      [config.class_names[j] for j in values("label_ids", np.int64).tolist()],
                      values("scores").tolist(),
                      embedding=embedding if embedding.size else None,
                      object_embeddings=objects if objects.size else None,
                      class_probabilities=(probabilities if config.probabilities
                                           and batch["probabilities"][i] else None))


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
        pred = _prediction(batch, i, config)
        metadata = batch["metadata"][i] if "metadata" in batch else ""
        entry = make_entry(pred.id, pred.boxes, pred.labels, pred.scores,
                           json.loads(metadata) if metadata else None,
                           str(batch["digest"][i]) if "digest" in batch else None,
                           pred.class_probabilities)
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
