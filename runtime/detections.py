"""One batch's outputs as each image's detections: the step every executor (the server's
engine, the Ray actors) answers through, so that their files are the same."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from pretag.preprocess import normalize_boxes
from pretag.runtime.backend import Outputs


@dataclass(frozen=True)
class BatchInfo:
    """What a caller learns about the batch its item ran in."""

    queue_s: float
    compute_s: float
    batch_size: int


@dataclass(frozen=True)
class Raw:
    """One image's slice of the batch outputs (valid detections only)."""

    boxes: np.ndarray
    scores: np.ndarray
    labels: np.ndarray
    valid: tuple[int, int]
    embedding: np.ndarray | None
    object_embeddings: np.ndarray | None  # [n, E], one row per valid detection
    class_probabilities: np.ndarray | None = None  # [n, C], one row per valid detection


@dataclass(frozen=True)
class Result:
    """Detections for one image, boxes normalised to [0, 1] of the original."""

    boxes: np.ndarray  # float32 [n, 4]
    scores: np.ndarray  # float32 [n]
    labels: tuple[str, ...]
    label_ids: np.ndarray  # int64 [n]
    width: int
    height: int
    info: BatchInfo
    embedding: np.ndarray | None = None  # [D]
    object_embeddings: np.ndarray | None = None  # [n, E], aligned with boxes
    metadata: dict[str, float] | None = None  # pixel metadata (pretag.health), when asked
    class_probabilities: np.ndarray | None = None  # [n, C], aligned with boxes


def split_outputs(out: Outputs, valid: Sequence[tuple[int, int]]) -> list[Raw]:
    """Each image's valid detections (and vectors) from one batch's outputs; ``valid``:
    the (height, width) of each resized image inside the padded canvas."""
    raws = []
    for i, size in enumerate(valid):
        n = int(out.num_detections[i])
        raws.append(Raw(out.boxes[i, :n], out.scores[i, :n], out.labels[i, :n],
                        (int(size[0]), int(size[1])),
                        None if out.embeddings is None else out.embeddings[i],
                        None if out.object_embeddings is None
                        else out.object_embeddings[i, :n],
                        None if out.class_probabilities is None
                        else out.class_probabilities[i, :n]))
    return raws


def to_result(raw: Raw, original: tuple[int, int], info: BatchInfo, threshold: float,
              class_names: Sequence[str]) -> Result:
    """The detections at or above ``threshold``, boxes normalised to the original image
    of ``original`` (height, width). Every executor (server, Ray) answers through this."""
    keep = raw.scores >= threshold
    ids = raw.labels[keep].astype(np.int64)
    height, width = original
    objects = None if raw.object_embeddings is None else raw.object_embeddings[keep]
    probabilities = (None if raw.class_probabilities is None
                     else raw.class_probabilities[keep].astype(np.float32))
    return Result(normalize_boxes(raw.boxes[keep], raw.valid),
                  raw.scores[keep].astype(np.float32),
                  tuple(class_names[i] for i in ids), ids, width, height, info, raw.embedding,
                  objects, class_probabilities=probabilities)


def request_message(request_id: str, reason: str) -> str:
    """How a refused request is described to its caller (the server's answers, and the Ray
    path's errors.jsonl lines for the same images)."""
    return f"request {request_id!r}: {reason}"
