"""YOLOX adapter: same accuracy as a plain numpy decode of the original file."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import onnx
import onnxruntime as ort
import pytest

from pretag.client import Client
from pretag.contract import DRIVING_CLASSES, ContractError, validate_model
from pretag.evaluate import ImagePrediction, coco_ap
from pretag.export.common import ExportError
from pretag.export.yolox import COCO80, YoloxExport, export_yolox
from pretag.preprocess import normalize_boxes, preprocess
from pretag.server.app import BackgroundServer
from pretag.server.config import server_config

pytestmark = pytest.mark.slow  # see the README: pytest -m "not slow"

SCORE, NMS, TOP_K = 0.05, 0.45, 100


def reference_predict(session: ort.InferenceSession, path: Path) -> ImagePrediction:
    """YOLOX's demo pipeline, written plainly: letterbox, decode, NMS per class."""
    img = cv2.imread(str(path))
    r = 416 / max(img.shape[:2])
    resized = cv2.resize(img, (int(img.shape[1] * r), int(img.shape[0] * r)),
                         interpolation=cv2.INTER_LINEAR)
    canvas = np.full((416, 416, 3), 114, dtype=np.uint8)
    canvas[:resized.shape[0], :resized.shape[1]] = resized
    raw = session.run(None, {"images": canvas.transpose(2, 0, 1)[None].astype(np.float32)})[0][0]
    grids, strides = [], []
    for s in (8, 16, 32):
        ys, xs = np.meshgrid(np.arange(416 // s), np.arange(416 // s), indexing="ij")
        grids.append(np.stack([xs, ys], -1).reshape(-1, 2))
        strides.append(np.full((grids[-1].shape[0], 1), s))
    grid, stride = np.concatenate(grids), np.concatenate(strides)
    xy = (raw[:, :2] + grid) * stride
    wh = np.exp(raw[:, 2:4]) * stride
    boxes = np.concatenate([xy - wh / 2, xy + wh / 2], 1) / r
    boxes = np.clip(boxes, 0, [img.shape[1], img.shape[0]] * 2)
    ids = [COCO80.index(n) for n in DRIVING_CLASSES]
    scores = raw[:, 4:5] * raw[:, 5:][:, ids]
    out_boxes, out_scores, out_labels = [], [], []
    for c in range(len(ids)):
        keep = np.where(scores[:, c] > SCORE)[0]
        b = boxes[keep]
        xywh = np.concatenate([b[:, :2], b[:, 2:] - b[:, :2]], 1).tolist()
        kept = cv2.dnn.NMSBoxes(xywh, scores[keep, c].tolist(), SCORE, NMS)
        for k in np.asarray(kept, dtype=int).reshape(-1):
            out_boxes.append(b[k])
            out_scores.append(scores[keep[k], c])
            out_labels.append(DRIVING_CLASSES[c])
    order = np.argsort(-np.asarray(out_scores))[:TOP_K]
    return ImagePrediction(path.name, np.asarray(out_boxes).reshape(-1, 4)[order],
                           np.asarray(out_scores)[order], [out_labels[i] for i in order])


def contract_predict(session: ort.InferenceSession, paths: list[Path], spec, batch_size: int
                     ) -> list[ImagePrediction]:
    preds = []
    for start in range(0, len(paths), batch_size):
        chunk = paths[start:start + batch_size]
        batch, originals = preprocess([p.read_bytes() for p in chunk], spec.resize)
        boxes, scores, labels, counts = session.run(
            ["boxes", "scores", "labels", "num_detections"],
            {"images": batch.images, "image_sizes": batch.image_sizes})
        for i, path in enumerate(chunk):
            n = int(counts[i])
            norm = normalize_boxes(boxes[i, :n], tuple(batch.image_sizes[i]))
            h, w = originals[i]
            preds.append(ImagePrediction(path.name, norm * [w, h, w, h], scores[i, :n],
                                         [spec.class_names[j] for j in labels[i, :n]]))
    return preds


@pytest.fixture(scope="module")
def coco_images(coco128: Path) -> list[Path]:
    paths = sorted((coco128 / "images").rglob("*.jpg"))
    assert len(paths) == 128
    return paths


def _ap(model: Path, paths: list[Path], coco128: Path) -> float:
    spec = validate_model(model)
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    preds = contract_predict(session, paths, spec, batch_size=4)
    return coco_ap(preds, coco128 / "annotations" / "instances_train2017.json", DRIVING_CLASSES)


@pytest.fixture(scope="module")
def contract_ap(yolox_model: Path, coco_images: list[Path], coco128: Path) -> float:
    """AP@[.5:.95] over the seven classes of the float32 contract model on coco128."""
    return _ap(yolox_model, coco_images, coco128)


def test_ap_equals_reference_decode(contract_ap, yolox_original, coco_images, coco128):
    original = ort.InferenceSession(str(yolox_original), providers=["CPUExecutionProvider"])
    ann = coco128 / "annotations" / "instances_train2017.json"
    reference = [reference_predict(original, p) for p in coco_images]
    ap_ours = contract_ap
    ap_ref = coco_ap(reference, ann, DRIVING_CLASSES)
    print(f"AP@[.5:.95] seven classes: contract model {ap_ours:.4f}, reference {ap_ref:.4f}")
    assert ap_ref > 0.2, "the reference decode itself is broken"
    assert abs(ap_ours - ap_ref) <= 0.005


def test_batch_of_four_equals_single(yolox_model, coco_images):
    spec = validate_model(yolox_model)
    session = ort.InferenceSession(str(yolox_model), providers=["CPUExecutionProvider"])
    paths = coco_images[60:68]  # includes people and vehicles
    one = contract_predict(session, paths, spec, batch_size=1)
    four = contract_predict(session, paths, spec, batch_size=4)
    assert sum(len(p.scores) for p in one) > 0
    for a, b in zip(one, four, strict=True):
        np.testing.assert_array_equal(a.boxes, b.boxes)
        np.testing.assert_array_equal(a.scores, b.scores)
        assert a.labels == b.labels


def _outputs(session: ort.InferenceSession, paths: list[Path], spec) -> dict[str, np.ndarray]:
    batch, _ = preprocess([p.read_bytes() for p in paths], spec.resize)
    names = [o.name for o in session.get_outputs()]
    out = session.run(names, {"images": batch.images, "image_sizes": batch.image_sizes})
    return {"image_sizes": batch.image_sizes, "canvas": batch.images, **dict(zip(names, out,
                                                                                strict=True))}


def test_embeddings_match_numpy_from_the_original_graph(yolox_model, yolox_original,
                                                        coco_images):
    """Image vectors: valid-region means of the head inputs; object vectors: the stem output
    at the anchor of each detection, found again from the raw scores and boxes; class
    probabilities: that anchor's class sigmoids over the model's classes, normalised."""
    from pretag.export.yolox import expose_head, load_original

    spec = validate_model(yolox_model)
    assert (spec.embedding_dim, spec.object_embedding_dim) == (64 + 128 + 256, 64)
    original = load_original(yolox_original)
    expose_head(original)
    plain = ort.InferenceSession(original.SerializeToString(), providers=["CPUExecutionProvider"])
    session = ort.InferenceSession(str(yolox_model), providers=["CPUExecutionProvider"])
    ids = [COCO80.index(n) for n in DRIVING_CLASSES]
    checked = 0
    for path in coco_images[60:66]:
        ours = _outputs(session, [path], spec)
        bgr = ours["canvas"][:, ::-1].astype(np.float32)  # the letterbox value is already 114
        raw, *feats = plain.run(None, {"images": bgr})
        h, w = ours["image_sizes"][0]
        means = [f[0, :, :-(-h // s), :-(-w // s)].mean(axis=(1, 2))
                 for f, s in zip(feats[:3], (8, 16, 32), strict=True)]
        np.testing.assert_allclose(ours["embeddings"][0], np.concatenate(means), rtol=1e-4,
                                   atol=1e-4)
        per_anchor = np.concatenate([f[0].reshape(f.shape[1], -1).T for f in feats[3:]])
        scores = raw[0, :, 4:5] * raw[0, :, 5:][:, ids]
        for k in range(int(ours["num_detections"][0])):
            label, score = ours["labels"][0, k], ours["scores"][0, k]
            anchor = int(np.argmin(np.abs(scores[:, label] - score)))
            assert abs(scores[anchor, label] - score) < 1e-5
            np.testing.assert_allclose(ours["object_embeddings"][0, k], per_anchor[anchor],
                                       rtol=1e-5, atol=1e-5)
            classes = raw[0, anchor, 5:][ids]  # the class sigmoids, objectness left out
            np.testing.assert_allclose(ours["class_probabilities"][0, k],
                                       classes / classes.sum(), rtol=1e-5, atol=1e-6)
            checked += 1
        n = int(ours["num_detections"][0])
        assert (ours["object_embeddings"][0, n:] == 0).all()
        assert (ours["class_probabilities"][0, n:] == 0).all()
        np.testing.assert_allclose(ours["class_probabilities"][0, :n].sum(axis=1), 1, atol=1e-5)
    assert checked >= 20
    assert spec.class_probability_method.startswith("each class's score")


def test_vectors_of_a_batch_of_eight_equal_single_runs(yolox_model, coco_images):
    spec = validate_model(yolox_model)
    session = ort.InferenceSession(str(yolox_model), providers=["CPUExecutionProvider"])
    paths = coco_images[60:68]
    eight = _outputs(session, paths, spec)
    for i, path in enumerate(paths):
        one = _outputs(session, [path], spec)
        np.testing.assert_array_equal(one["embeddings"][0], eight["embeddings"][i])
        n = int(one["num_detections"][0])
        np.testing.assert_array_equal(one["object_embeddings"][0, :n],
                                      eight["object_embeddings"][i, :n])
        np.testing.assert_array_equal(one["class_probabilities"][0, :n],
                                      eight["class_probabilities"][i, :n])


def test_original_file_is_not_a_contract_model(yolox_original):
    with pytest.raises(ContractError) as err:
        validate_model(yolox_original)
    text = str(err.value)
    assert "input 'image_sizes' is missing" in text and "output 'boxes' is missing" in text
    assert "axis 0 is fixed to 1" in text


def test_bad_inputs_are_clear(tmp_path, yolox_original):
    with pytest.raises(ExportError, match="does not exist"):
        export_yolox(YoloxExport(onnx=tmp_path / "nope.onnx", output=tmp_path / "o.onnx"))
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(ExportError):
        export_yolox(YoloxExport(onnx=junk, output=tmp_path / "o.onnx"))
    assert not (tmp_path / "o.onnx").exists()


def test_coco_classes_and_cli(tmp_path, yolox_original):
    from pretag.cli import main

    out = tmp_path / "coco.onnx"
    assert main(["export", "yolox", "--onnx", str(yolox_original), "--output", str(out),
                 "--classes", "coco"]) == 0
    spec = validate_model(out)
    assert spec.class_names == COCO80 and spec.resize.canvas == (416, 416)
    assert spec.source_sha256.startswith("e8af0749")


def _initializer_types(path: Path) -> Counter[str]:
    model = onnx.load(str(path))
    return Counter(onnx.TensorProto.DataType.Name(t.data_type) for t in model.graph.initializer)


def test_fp16_export_keeps_accuracy_and_serves(tmp_path, yolox_original, yolox_model,
                                               coco_images, coco128, contract_ap):
    """--fp16: the network body in float16, contract I/O unchanged, same AP within 0.005.

    ONNX Runtime's CPU provider runs float16 nodes by casting around those it has no
    float16 kernel for, so activations are rounded to float16 between nodes as on a GPU.
    """
    from pretag.cli import main

    out = tmp_path / "fp16.onnx"
    assert main(["export", "yolox", "--onnx", str(yolox_original), "--output", str(out),
                 "--fp16"]) == 0
    spec = validate_model(out)
    assert spec.precision == "fp16" and validate_model(yolox_model).precision == "fp32"
    types = _initializer_types(out)
    assert types["FLOAT16"] >= 200 and types["FLOAT16"] > 20 * types["FLOAT"], types
    assert out.stat().st_size < 0.6 * yolox_model.stat().st_size
    ap16, ap32 = _ap(out, coco_images, coco128), contract_ap
    print(f"AP@[.5:.95] seven classes: fp16 {ap16:.4f}, fp32 {ap32:.4f}")
    assert abs(ap16 - ap32) <= 0.005
    config = server_config(model=out, host="127.0.0.1", port=0, metrics_port=None)
    with BackgroundServer(config) as server, Client(f"127.0.0.1:{server.port}") as client:
        assert client.model_info().precision == "fp16"
        pred = client.detect(coco_images[61].read_bytes())
        assert pred.error is None and len(pred.labels) > 0
