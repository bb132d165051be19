"""Hand-off to labelling: the picked images with pretag's boxes as pre-annotations.

* ``coco``: one COCO instances file (CVAT and Label Studio import it), boxes in pixels,
  each annotation with its ``score``.
* ``lightly``: Lightly's prediction format: ``tasks.json``, ``<task>/schema.json`` and one
  ``{"file_name", "predictions": [{"category_id", "bbox": [x, y, w, h], "score"}]}`` per image.

Boxes are stored normalised, so both need the images' pixel sizes: read from the headers of
the files under the run's input folder.
"""

from __future__ import annotations

import json
from pathlib import Path, PurePosixPath
from typing import Any

from pretag.job.outputs import TASK, write_atomic, write_task_files
from pretag.job.video import SampleImages, VideoError
from pretag.preprocess import ImageError
from pretag.selection.config import SelectionConfigError
from pretag.selection.predictions import RunPredictions

FORMATS = ("coco", "lightly", "yolo", "cvat", "label-studio")  # the last three: handoff.py


def sized(run: RunPredictions, images: Path, names: list[str]
           ) -> list[tuple[str, dict[str, Any], int, int]]:
    """Each picked image's usable detections and pixel size (a video frame's, upright)."""
    samples = SampleImages(images)
    rows = []
    for name in names:
        if name not in run.entries:
            raise SelectionConfigError(f"no prediction for {name}")
        entry = run.usable(name)
        try:
            width, height = samples.size(name)
        except (OSError, ImageError, VideoError) as exc:
            raise SelectionConfigError(f"cannot read the size of {images / name}: {exc}"
                                       ) from None
        rows.append((name, entry, width, height))
    return rows


def _pixels(box: list[float], width: int, height: int) -> list[float]:
    x1, y1, x2, y2 = box
    return [round(x1 * width, 2), round(y1 * height, 2), round((x2 - x1) * width, 2),
            round((y2 - y1) * height, 2)]


def export_coco(run: RunPredictions, images: Path, names: list[str], path: Path) -> None:
    classes = run.classes
    coco: dict[str, Any] = {"images": [], "annotations": [], "categories": [
        {"id": i + 1, "name": c} for i, c in enumerate(classes)]}
    for image_id, (name, entry, w, h) in enumerate(sized(run, images, names), start=1):
        coco["images"].append({"id": image_id, "file_name": name, "width": w, "height": h})
        for box, label, score in zip(entry["boxes"], entry["labels"], entry["scores"],
                                     strict=True):
            bbox = _pixels(box, w, h)
            coco["annotations"].append({
                "id": len(coco["annotations"]) + 1, "image_id": image_id,
                "category_id": classes.index(label) + 1, "bbox": bbox,
                "area": round(bbox[2] * bbox[3], 2), "iscrowd": 0, "score": score})
    write_atomic(path, json.dumps(coco) + "\n")


def export_lightly(run: RunPredictions, images: Path, names: list[str], root: Path) -> None:
    classes = run.classes
    predictions = root / ".lightly" / "predictions"
    write_task_files(root, classes)  # the run's own layout: tasks.json and schema.json
    for name, entry, w, h in sized(run, images, names):
        record = {"file_name": name, "predictions": [
            {"category_id": classes.index(label), "bbox": _pixels(box, w, h), "score": score}
            for box, label, score in zip(entry["boxes"], entry["labels"], entry["scores"],
                                         strict=True)]}
        target = predictions / TASK / PurePosixPath(name).with_suffix(".json")
        write_atomic(target, json.dumps(record) + "\n")


def parents(run: RunPredictions, crops: list[str]) -> tuple[RunPredictions, list[str]]:
    """Object-level picks as their parent images holding only the picked boxes (what every
    export writes for them), and those images in the order of their first pick."""
    keep: dict[str, list[int]] = {}
    for crop in crops:
        name, index = crop_source(crop)
        keep.setdefault(name, []).append(index)
    entries = {}
    for name, indices in keep.items():
        entry = run.entries[name]
        chosen = sorted(set(indices))
        entries[name] = {**entry, **{key: [entry[key][i] for i in chosen]
                                     for key in ("boxes", "labels", "scores")}}
    return RunPredictions(run.classes, entries, {}), list(keep)


def crop_source(crop: str) -> tuple[str, int]:
    """The image and detection index of a crop named ``<stem>-<index>-<ext>``."""
    path = PurePosixPath(crop)
    stem, index, ext = path.name.rsplit("-", 2)
    return str(path.with_name(f"{stem}.{ext}")), int(index)


def padded_box(box: list[float], width: int, height: int, padding: float
               ) -> tuple[int, int, int, int]:
    """Pixel box widened by ``padding`` of its width and height (Lightly's object-level
    padding: 0.1 adds 10%), centred, clipped to the image, at least one pixel."""
    x1, y1, x2, y2 = box[0] * width, box[1] * height, box[2] * width, box[3] * height
    grow_x, grow_y = (x2 - x1) * padding / 2, (y2 - y1) * padding / 2
    left = min(max(0, int(x1 - grow_x)), width - 1)
    top = min(max(0, int(y1 - grow_y)), height - 1)
    return (left, top, max(left + 1, min(width, round(x2 + grow_x))),
            max(top + 1, min(height, round(y2 + grow_y))))


def write_crops(run: RunPredictions, images: Path, crops: list[str], padding: float,
                out: Path) -> int:
    """Each picked crop as a PNG under ``out`` (``<crop name>.png``); returns how many.
    Crops of unusable detections are never picked (see :mod:`.predictions`)."""
    import cv2

    samples = SampleImages(images)
    written = 0
    for crop in crops:
        name, index = crop_source(crop)
        entry = run.entries.get(name)
        if entry is None or index >= len(entry["boxes"]) or index in run.bad.get(name, {}):
            raise SelectionConfigError(f"no usable detection {index} of {name}")
        try:
            bgr = samples.read_bgr(name)  # an image file, or a frame of a video
        except (OSError, ImageError, VideoError) as exc:
            raise SelectionConfigError(f"cannot read {images / name}: {exc}") from None
        x1, y1, x2, y2 = padded_box(entry["boxes"][index], bgr.shape[1], bgr.shape[0],
                                    padding)
        target = out / f"{crop}.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        ok, data = cv2.imencode(".png", bgr[y1:y2, x1:x2])
        if not ok:
            raise OSError(f"cannot encode the crop {crop}")
        target.write_bytes(data.tobytes())
        written += 1
    return written
