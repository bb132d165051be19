"""The read path's reduced JPEG decode: when it applies, and that it changes no detection
on the real driving frames beyond what a resampling filter may."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image

from pretag.contract import ResizeSpec, read_model_spec
from pretag.preprocess import check_header, prepare, preprocess, reduction

LETTERBOX_640 = ResizeSpec("longest_edge", max_size=640, pad_value=114, canvas=(640, 640))
#: A detection at or over SHOWN in one decode must be found in the other at or over
#: SHOWN - SCORE_SLACK (the largest change measured on these frames is 0.055).
SHOWN, SCORE_SLACK = 0.3, 0.06
#: Boxes under SMALL_PX on a side (model canvas pixels) are compared by their edges:
#: a 1.8 px shift of a 19x14 px car is IoU 0.88.
SMALL_PX, EDGE_PX = 16, 2.0


def _jpeg(width: int, height: int, **kw: object) -> bytes:
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90, **kw)
    return buf.getvalue()


def test_the_reduction_is_the_largest_that_still_covers_the_canvas(shared: Path):
    nuscenes = (shared / "data" / "driving" / "nuscenes_cam_front.jpg").read_bytes()
    header = check_header(nuscenes)  # 1600x900
    assert reduction(header, LETTERBOX_640) == 2  # 800x450 >= 640x360; 400 < 640
    assert reduction(header, ResizeSpec("longest_edge", max_size=416)) == 2  # 400 < 416
    assert reduction(header, ResizeSpec("longest_edge", max_size=200)) == 8  # 200x112
    assert reduction(header, ResizeSpec("longest_edge", max_size=399)) == 4
    # Faster R-CNN's 800/1333 upscales a 900-line frame: nothing to reduce.
    assert reduction(header, ResizeSpec("shortest_edge", min_size=800, max_size=1333)) == 1
    kitti = (shared / "data" / "driving" / "kitti_000000.png").read_bytes()
    assert reduction(check_header(kitti), ResizeSpec("longest_edge", max_size=64)) == 1  # PNG


def test_a_reduced_decode_gives_the_full_decodes_sizes():
    for data in (_jpeg(1603, 901), _jpeg(333, 1001)):  # odd sizes: libjpeg rounds up
        full, original = prepare(data, LETTERBOX_640, reduced=False)
        _, original_small = prepare(data, ResizeSpec("longest_edge", max_size=300))
        assert original_small == original
        reduced, original_reduced = prepare(data, LETTERBOX_640)
        assert original_reduced == original and reduced.shape == full.shape


def test_exif_orientation_survives_the_reduced_decode():
    """The decoder turns a side-swapping EXIF orientation; the original size follows."""
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    data = _jpeg(1600, 900, exif=exif.tobytes())
    spec = ResizeSpec("longest_edge", max_size=500)
    assert reduction(check_header(data), spec) == 2  # 800 >= 500 > 400
    full, original = prepare(data, spec, reduced=False)
    reduced, original_reduced = prepare(data, spec)
    assert original == original_reduced == (1600, 900)
    assert reduced.shape == full.shape == (500, 281, 3)


def _detections(session: ort.InferenceSession, resize: ResizeSpec, data: bytes,
                reduced: bool) -> list[tuple[int, float, np.ndarray]]:
    batch, _ = preprocess([data], resize, reduced=reduced)
    boxes, scores, labels, count = session.run(
        ["boxes", "scores", "labels", "num_detections"],
        {"images": batch.images, "image_sizes": batch.image_sizes})
    n = int(count[0])
    return [(int(label), float(score), box) for box, score, label
            in zip(boxes[0][:n], scores[0][:n], labels[0][:n], strict=True)]


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - w * h
    return float(w * h / union)


def _same(box: np.ndarray, other: np.ndarray) -> bool:
    if min(b[2] - b[0] for b in (box, other)) < SMALL_PX or \
            min(b[3] - b[1] for b in (box, other)) < SMALL_PX:
        return float(np.abs(box - other).max()) <= EDGE_PX
    return _iou(box, other) >= 0.9


def _unmatched(these: list, those: list) -> list:
    missing = []
    for label, score, box in these:
        if score < SHOWN:
            continue
        if not any(label == other_label and other_score >= SHOWN - SCORE_SLACK
                   and abs(other_score - score) <= SCORE_SLACK and _same(box, other_box)
                   for other_label, other_score, other_box in those):
            missing.append((label, round(score, 3), box.round(1).tolist()))
    return missing


@pytest.mark.slow
@pytest.mark.parametrize("size", [416, 640])
def test_driving_detections_are_unchanged_by_the_reduced_decode(
        shared: Path, yolox_original: Path, tmp_path: Path, size: int):
    from pretag.export.yolox import YoloxExport, export_yolox

    model = tmp_path / f"yolox_{size}.onnx"
    export_yolox(YoloxExport(onnx=yolox_original, output=model, input_size=size))
    resize = read_model_spec(model).resize
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    compared = 0
    for path in sorted((shared / "data" / "driving").iterdir()):
        data = path.read_bytes()
        full = _detections(session, resize, data, reduced=False)
        reduced = _detections(session, resize, data, reduced=True)
        if path.suffix == ".png":  # no reduced decoder: the very same detections
            assert [(lbl, s) for lbl, s, _ in full] == [(lbl, s) for lbl, s, _ in reduced]
            continue
        assert reduction(check_header(data), resize) == 2
        assert _unmatched(full, reduced) == [], path.name
        assert _unmatched(reduced, full) == [], path.name
        compared += sum(score >= SHOWN for _, score, _ in full)
    assert compared >= 5  # the frames have enough detections for this to mean something
