"""YOLOX-Nano at letterbox sizes 416, 512 and 640.

For each size: AP@[.5:.95] on coco128 (seven classes, every detection down to the in-graph
0.05), model-only images/s (ONNX Runtime CPU, batch 4, median of 3 passes over coco128,
decode and resize excluded), and detections at score >= 0.3 on the driving frames (those
under 32x32 original pixels counted as small). Prints one JSON line per size.

    python benchmarks/yolox_sizes.py ../shared
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import onnxruntime as ort

from pretag.contract import DRIVING_CLASSES, ModelSpec, validate_model
from pretag.evaluate import ImagePrediction, coco_ap
from pretag.export.yolox import YoloxExport, export_yolox
from pretag.preprocess import normalize_boxes, preprocess

OUTPUTS = ["boxes", "scores", "labels", "num_detections"]


def predict(session: ort.InferenceSession, spec: ModelSpec, paths: list[Path],
            batch_size: int = 4) -> list[ImagePrediction]:
    preds = []
    for start in range(0, len(paths), batch_size):
        chunk = paths[start:start + batch_size]
        batch, originals = preprocess([p.read_bytes() for p in chunk], spec.resize)
        boxes, scores, labels, counts = session.run(
            OUTPUTS, {"images": batch.images, "image_sizes": batch.image_sizes})
        for i, path in enumerate(chunk):
            n, (h, w) = int(counts[i]), originals[i]
            norm = normalize_boxes(boxes[i, :n], tuple(batch.image_sizes[i]))
            preds.append(ImagePrediction(path.name, norm * [w, h, w, h], scores[i, :n],
                                         [spec.class_names[j] for j in labels[i, :n]]))
    return preds


def images_per_s(session: ort.InferenceSession, spec: ModelSpec, paths: list[Path]) -> float:
    batches = [preprocess([p.read_bytes() for p in paths[s:s + 4]], spec.resize)[0]
               for s in range(0, len(paths), 4)]
    rates = []
    for _ in range(3):
        start = time.perf_counter()
        for b in batches:
            session.run(["num_detections"], {"images": b.images, "image_sizes": b.image_sizes})
        rates.append(len(paths) / (time.perf_counter() - start))
    return statistics.median(rates)


def main() -> None:
    shared = Path(sys.argv[1] if len(sys.argv) > 1 else "../shared")
    coco = sorted((shared / "data" / "coco128" / "images").rglob("*.jpg"))
    driving = sorted((shared / "data" / "driving").iterdir())
    ann = shared / "data" / "coco128" / "annotations" / "instances_train2017.json"
    with tempfile.TemporaryDirectory() as tmp:
        for size in (416, 512, 640):
            out = Path(tmp) / f"yolox_{size}.onnx"
            export_yolox(YoloxExport(onnx=shared / "models" / "yolox_nano.onnx", output=out,
                                     input_size=size))
            spec = validate_model(out)
            session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
            ap = coco_ap(predict(session, spec, coco), ann, DRIVING_CLASSES)
            found = predict(session, spec, driving, batch_size=1)
            sure = [p.boxes[p.scores >= 0.3] for p in found]
            small = sum(int((((b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])) < 32 * 32).sum())
                        for b in sure)
            print(json.dumps({"size": size, "ap": round(ap, 4),
                              "images_per_s": round(images_per_s(session, spec, coco), 1),
                              "driving_objects_03": int(sum(len(b) for b in sure)),
                              "driving_small_03": small}), flush=True)
            del session


if __name__ == "__main__":
    main()
