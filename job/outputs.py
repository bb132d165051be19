"""The run folder's layout: Lightly-style prediction files and what checks them.

Layout under the output folder::

    .lightly/predictions/tasks.json                      ["lightly_pretagging"]
    .lightly/predictions/lightly_pretagging/schema.json  task type and classes
    .lightly/predictions/lightly_pretagging/<image path without extension>.json

Every prediction file holds a list with one entry, ``{"filename", "boxes",
"labels", "scores"}``, boxes x1, y1, x2, y2 normalised to [0, 1], in score order.
Files are written whole (:func:`pretag.job.storage.write_whole`: a rename locally,
one PUT on object storage), so a killed run never leaves a half-written one; a re-run
skips images whose file exists and parses. Inputs and outputs may be local paths or
object-storage URLs (:mod:`pretag.job.storage`); inputs are listed by
:mod:`pretag.job.sources`.
``report/run_settings.json`` records what made them (model, threshold), so that a
re-run with other settings does not silently keep the old files.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Protocol

from pretag.health import METADATA_KEYS
from pretag.job.storage import AnyPath, find_under, write_whole

TASK = "lightly_pretagging"


def predictions_dir(output_dir: AnyPath) -> AnyPath:
    return output_dir / ".lightly" / "predictions"


def prediction_path(output_dir: AnyPath, name: str) -> AnyPath:
    """Where the prediction of image ``name`` goes: always inside the task folder."""
    rel = PurePosixPath(name)
    if rel.is_absolute() or not rel.parts or any(p in ("..", ".") for p in rel.parts):
        raise ValueError(f"image name {name!r} would place its prediction outside "
                         f"{predictions_dir(output_dir) / TASK}")
    return predictions_dir(output_dir) / TASK / rel.with_suffix(".json")


#: Bytes an image's file name may have before its extension: its prediction's temporary
#: (``.<stem>.json.tmp``) and its crops (``<stem>-<detection>-<ext>.png``) must fit in
#: the 255 bytes a local file name may have.
MAX_STEM_BYTES = 255 - len(".-9999-jpeg.png.tmp")
#: Files of the task folder that no image's prediction may take.
RESERVED = frozenset({"schema.json"})


def name_problem(name: str) -> str | None:
    """Why image ``name`` cannot be written under the run's layout, or None."""
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        return (f"its name {name!r} holds a control character (a newline or tab would "
                f"break selected.txt and other one-name-a-line files); rename the file")
    stem = PurePosixPath(name).stem
    if len(stem.encode()) > MAX_STEM_BYTES:
        return (f"its file name is {len(stem.encode())} bytes before the extension; "
                f"prediction, vector and crop files need at most {MAX_STEM_BYTES}")
    if written_name(name) in RESERVED:
        return (f"its prediction would be {written_name(name)}, a file of the run's own "
                f"(the task schema); rename the file or move it into a subfolder")
    return None


def written_predictions(output_dir: AnyPath) -> set[str]:
    """The prediction files under the task folder (paths relative to it, with ``/``), from
    one listing: resuming then reads only the predictions that exist, instead of asking
    storage about every image (one request each on object storage)."""
    root = predictions_dir(output_dir) / TASK
    if isinstance(root, Path):
        found = ({p.relative_to(root).as_posix() for p in root.rglob("*.json")}
                 if root.is_dir() else set())
    else:
        found = {name for name in find_under(root) if name.endswith(".json")}
    return found - RESERVED


def written_name(name: str) -> str:
    """Image ``name``'s entry in :func:`written_predictions`."""
    return PurePosixPath(name).with_suffix(".json").as_posix()


def write_atomic(path: AnyPath, text: str) -> None:
    """Write ``text`` to ``path`` whole (see :func:`pretag.job.storage.write_whole`)."""
    write_whole(path, text.encode())


def settings_path(output_dir: AnyPath) -> AnyPath:
    return output_dir / "report" / "run_settings.json"


def read_settings(output_dir: AnyPath) -> dict[str, Any] | None:
    """The settings recorded by an earlier run in ``output_dir``, or None."""
    try:
        data = json.loads(settings_path(output_dir).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def write_settings(output_dir: AnyPath, settings: dict[str, Any]) -> None:
    write_atomic(settings_path(output_dir), json.dumps(settings, indent=2) + "\n")


def write_task_files(output_dir: AnyPath, class_names: Sequence[str]) -> None:
    root = predictions_dir(output_dir)
    write_atomic(root / "tasks.json", json.dumps([TASK], indent=2) + "\n")
    schema = {"task_type": "object-detection",
              "categories": [{"id": i, "name": n} for i, n in enumerate(class_names)]}
    write_atomic(root / TASK / "schema.json", json.dumps(schema, indent=2) + "\n")


class Answer(Protocol):
    """What the job stores of one image's answer: :class:`Detections`, or the SDK's
    ``Prediction``, which has the same attributes."""

    @property
    def id(self) -> str: ...
    @property
    def boxes(self) -> Sequence[Sequence[float]]: ...
    @property
    def labels(self) -> Sequence[str]: ...
    @property
    def scores(self) -> Sequence[float]: ...
    @property
    def embedding(self) -> Any: ...
    @property
    def object_embeddings(self) -> Any: ...


@dataclass(frozen=True)
class Detections:
    """One image's answer as the job stores it, whatever executor made it: the prediction
    entry's content and, when asked for, its vectors (``object_embeddings``: a row per
    detection). The SDK's ``Prediction`` has the same attributes."""

    id: str  # the image's name
    boxes: Sequence[Sequence[float]]
    labels: Sequence[str]
    scores: Sequence[float]
    embedding: Any = None  # numpy [D] or None
    object_embeddings: Any = None  # numpy [n, E] or None
    class_probabilities: Any = None  # numpy [n, C] or None


def make_entry(name: str, boxes: Sequence[Sequence[float]], labels: Sequence[str],
               scores: Sequence[float], metadata: Mapping[str, float] | None = None,
               content_hash: str | None = None, probabilities: Any = None
               ) -> dict[str, Any]:
    """One prediction entry, floats rounded to 6 places, in the order the server sent
    them: decreasing score, as the detector contract guarantees. With the image's pixel
    metadata (Lightly's keys, :data:`pretag.health.METADATA_KEYS`) and the hash of its
    file (exact duplicates), when known (pretag.job.health); ``probabilities``: each
    detection's class distribution [n, C] in the run's class order (Lightly's optional
    ``probabilities``), when the model gives them."""
    entry: dict[str, Any] = {"filename": name,
                             "boxes": [[round(v, 6) for v in box] for box in boxes],
                             "labels": list(labels),
                             "scores": [round(s, 6) for s in scores]}
    if metadata is not None:
        entry["metadata"] = {key: round(float(metadata[key]), 6) for key in METADATA_KEYS
                             if key in metadata}
    if content_hash:
        entry["content_hash"] = content_hash
    if probabilities is not None:
        entry["probabilities"] = [[round(float(v), 6) for v in row] for row in probabilities]
    return entry


def write_prediction(output_dir: AnyPath, entry: dict[str, Any]) -> None:
    write_atomic(prediction_path(output_dir, entry["filename"]), json.dumps([entry]) + "\n")


def read_prediction(output_dir: AnyPath, name: str) -> dict[str, Any] | None:
    """The entry already written for ``name``, or None if absent or unreadable."""
    path = prediction_path(output_dir, name)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    entry, problem = entry_of(data)
    if entry is None or problem is not None or entry["filename"] != name:
        return None
    return entry


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and \
        math.isfinite(value)


def box_problem(box: Any) -> str | None:
    """Why ``box`` is not a normalised x1, y1, x2, y2 box inside the image, or None."""
    if not (isinstance(box, list) and len(box) == 4 and all(_number(v) for v in box)):
        return f"box {box!r} is not four finite numbers"
    x1, y1, x2, y2 = box
    eps = 1e-6
    if not (-eps <= x1 <= x2 <= 1 + eps and -eps <= y1 <= y2 <= 1 + eps):
        return f"box {box!r} is inverted or outside the image (x1 <= x2, y1 <= y2, in [0, 1])"
    return None


def entry_of(data: Any) -> tuple[dict[str, Any] | None, str | None]:
    """The entry of a parsed prediction file (a list of one entry), and why it cannot be
    read (:func:`entry_problem`), if it cannot."""
    entry = data[0] if isinstance(data, list) and len(data) == 1 else None
    problem = entry_problem(entry)
    return (entry if problem is None else None), problem


def entry_problem(entry: Any) -> str | None:
    """Why a prediction entry cannot be read at all (its shape), or None."""
    if not isinstance(entry, dict) or not isinstance(entry.get("filename"), str):
        return "the entry is not an object with a filename"
    lists = [entry.get(k) for k in ("boxes", "labels", "scores")]
    if not all(isinstance(v, list) for v in lists):
        return "boxes, labels and scores must be lists"
    if len({len(v) for v in lists if isinstance(v, list)}) != 1:
        return "boxes, labels and scores differ in length"
    probabilities = entry.get("probabilities")
    if probabilities is not None and (not isinstance(probabilities, list)
                                      or len(probabilities) != len(entry["boxes"])):
        return "probabilities must be a list with one row per box"
    return None


def detection_problems(entry: dict[str, Any], classes: Sequence[str]) -> dict[int, str]:
    """Each detection of a well-shaped entry that cannot be used, by index, with why: a
    box that is not inside the image, a label that is not a class, a score that is not
    a finite number. Readers skip these; exports and crops never write them."""
    known = set(classes)
    found: dict[int, str] = {}
    rows = entry.get("probabilities")
    for i, (box, label, score) in enumerate(zip(entry["boxes"], entry["labels"],
                                                entry["scores"], strict=True)):
        problem = box_problem(box)
        if problem is None and label not in known:
            problem = f"label {label!r} is not one of the run's classes"
        if problem is None and not _number(score):
            problem = f"score {score!r} is not a finite number"
        if problem is None and rows is not None:
            problem = probability_problem(rows[i], len(classes))
        if problem is not None:
            found[i] = problem
    return found


def probability_problem(row: Any, classes: int) -> str | None:
    """Why a detection's class probabilities cannot be used, or None: one number in
    [0, 1] per class, summing to 1 (within 1e-3)."""
    if not isinstance(row, list) or len(row) != classes:
        return f"probabilities must be a list of {classes} numbers (one per class)"
    if not all(_number(v) and 0.0 <= v <= 1.0 for v in row):
        return "probabilities must be numbers in [0, 1]"
    if abs(sum(row) - 1.0) > 1e-3:
        return f"probabilities sum to {sum(row):.4f}, not 1"
    return None


def usable(entry: dict[str, Any], bad: dict[int, str]) -> dict[str, Any]:
    """``entry`` without the detections in ``bad``."""
    keep = [i for i in range(len(entry["boxes"])) if i not in bad]
    lists = ("boxes", "labels", "scores", "probabilities")
    return {**entry, **{k: [entry[k][i] for i in keep] for k in lists if k in entry}}
