"""COCO-style AP of predictions against COCO annotations (pycocotools)."""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class ImagePrediction:
    """Detections of one annotated image, boxes x1, y1, x2, y2 in original pixels."""

    file_name: str
    boxes: np.ndarray
    scores: np.ndarray
    labels: list[str]


def coco_ap(predictions: Iterable[ImagePrediction], annotations: str | Path,
            class_names: Iterable[str]) -> float:
    """AP@[.5:.95] over ``class_names`` on the images predicted (pycocotools' stats[0])."""
    try:
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
    except ImportError:
        raise RuntimeError("AP needs pycocotools: pip install 'pretag[dev]'") from None
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(annotations))
    by_name = {c["name"]: c["id"] for c in gt.loadCats(gt.getCatIds())}
    by_file = {img["file_name"]: img["id"] for img in gt.loadImgs(gt.getImgIds())}
    cat_ids = [by_name[n] for n in class_names]
    results, image_ids = [], []
    for pred in predictions:
        image_id = by_file[Path(pred.file_name).name]
        image_ids.append(image_id)
        for box, score, label in zip(pred.boxes, pred.scores, pred.labels, strict=True):
            x1, y1, x2, y2 = (float(v) for v in box)
            results.append({"image_id": image_id, "category_id": by_name[label],
                            "bbox": [x1, y1, x2 - x1, y2 - y1], "score": float(score)})
    if not results:
        return 0.0
    with contextlib.redirect_stdout(io.StringIO()):
        detections = gt.loadRes(results)
        ev = COCOeval(gt, detections, "bbox")
        ev.params.catIds = cat_ids
        ev.params.imgIds = sorted(set(image_ids))
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return float(ev.stats[0])
