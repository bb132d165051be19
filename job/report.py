"""Run reports: class histogram (JSON and PNG), debug images, the summary table."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from typing import Any

import cv2
import numpy as np

from pretag.job.outputs import write_atomic
from pretag.job.stats import Histogram, bar_chart
from pretag.job.storage import AnyPath, write_whole
from pretag.preprocess import decode_bgr

log = logging.getLogger(__name__)


def write_histogram(report_dir: AnyPath, hist: Histogram, threshold: float) -> None:
    """class_histogram.json and class_histogram.png (a bar chart of objects per class)."""
    data = hist.to_json() | {"score_threshold": threshold}
    write_atomic(report_dir / "class_histogram.json", json.dumps(data, indent=2) + "\n")
    names = list(hist.class_names)
    png = bar_chart(names, [data["objects_per_class"][n] for n in names],
                    f"{data['images']} images, {data['average_objects_per_image']:.2f} objects "
                    f"per image (score >= {threshold:g})",
                    size=(max(6.0, 0.9 * len(names)), 4.5), dpi=120, fontsize=9,
                    rotation=30 if len(names) > 8 else 0)
    write_whole(report_dir / "class_histogram.png", png)


def spread(count: int, total: int) -> list[int]:
    """``count`` indices spread evenly over ``range(total)``, first and last included."""
    if count <= 0 or total <= 0:
        return []
    if count >= total:
        return list(range(total))
    if count == 1:
        return [total // 2]
    return sorted({round(i * (total - 1) / (count - 1)) for i in range(count)})


_COLORS = [(216, 125, 59), (60, 180, 75), (230, 25, 75), (245, 130, 48), (145, 30, 180),
           (70, 240, 240), (240, 50, 230), (210, 245, 60)]


def draw_debug_image(image: AnyPath | np.ndarray, entry: dict[str, Any], out_path: AnyPath,
                     class_names: Sequence[str]) -> None:
    """The image (a file, or decoded BGR pixels such as a video frame) with its boxes,
    labels and scores drawn, saved as JPEG."""
    # OpenCV draws and encodes BGR
    img = image.copy() if isinstance(image, np.ndarray) else decode_bgr(image.read_bytes())
    h, w = img.shape[:2]
    thick = max(1, round(max(h, w) / 500))
    for box, label, score in zip(entry["boxes"], entry["labels"], entry["scores"], strict=True):
        x1, y1, x2, y2 = (round(v * s) for v, s in zip(box, (w, h, w, h), strict=True))
        idx = class_names.index(label) if label in class_names else 0
        color = _COLORS[idx % len(_COLORS)]
        cv2.rectangle(img, (x1, y1), (x2, y2), color, thick)
        text = f"{label} {score:.2f}"
        scale = 0.4 * thick
        (tw, th), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)
        top = max(0, y1 - th - base - 2)
        cv2.rectangle(img, (x1, top), (x1 + tw + 2, top + th + base + 2), color, -1)
        cv2.putText(img, text, (x1 + 1, top + th + 1), cv2.FONT_HERSHEY_SIMPLEX, scale,
                    (255, 255, 255), 1, cv2.LINE_AA)
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 90])
    if not ok:
        raise OSError(f"cannot encode debug image for {out_path}")
    write_whole(out_path, buf.tobytes())


def summary_table(rows: Sequence[tuple[str, str]]) -> str:
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k.ljust(width)}  {v}" for k, v in rows) + "\n"
