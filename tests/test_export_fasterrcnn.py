"""Faster R-CNN export: ONNX Runtime against torchvision eager on the same tensors.

Seeded random weights stand in for the COCO weights (no download here). Two
adjustments keep the comparison about the graph rather than about float noise:
the classifier is scaled by 0.5 so softmax scores stay spread (a random head
saturates them), and the RPN keeps 100/50 proposals, because random objectness
is nearly flat and a 1e-6 difference reorders a 1000-deep NMS cascade
(measured: 45 of 1000 proposals change). Trained weights have peaked objectness.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torchvision.ops import box_iou

from pretag.contract import DRIVING_CLASSES, ResizeSpec, validate_model
from pretag.export.common import ExportError
from pretag.export.fasterrcnn import (
    BatchedFasterRCNN,
    FasterRCNNExport,
    class_selection,
    eager_reference,
    export_fasterrcnn_model,
)
from pretag.export.weights import load_fasterrcnn
from pretag.preprocess import Batch, preprocess

pytestmark = pytest.mark.slow  # see the README: pytest -m "not slow"

SMALL = ResizeSpec("shortest_edge", min_size=224, max_size=320)


def _random_model() -> torch.nn.Module:
    loaded = load_fasterrcnn("random", seed=0, rpn_pre_nms_top_n_test=100,
                             rpn_post_nms_top_n_test=50)
    with torch.no_grad():
        loaded.model.roi_heads.box_predictor.cls_score.weight.mul_(0.5)
    return loaded.model


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return _random_model()


def _export(model: torch.nn.Module, out: Path, classes: str, threshold: float = 0.05,
            fp16: bool = False) -> Path:
    cfg = FasterRCNNExport(output=out, classes=classes, score_threshold=threshold,
                           min_size=SMALL.min_size, max_size=SMALL.max_size, fp16=fp16)
    export_fasterrcnn_model(model, cfg, "random:seed=0", "0" * 64)
    return out


@pytest.fixture(scope="module")
def coco_onnx(model: torch.nn.Module, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _export(model, tmp_path_factory.mktemp("frcnn") / "coco.onnx", "coco")


@pytest.fixture(scope="module")
def images(shared: Path) -> list[bytes]:
    files = sorted((shared / "data" / "driving").iterdir())
    return [f.read_bytes() for f in files[:2] + files[-2:]]


def _run(path: Path, batch: Batch) -> list[np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"images": batch.images, "image_sizes": batch.image_sizes})


def _assert_same(out: list[np.ndarray], ref: list[dict[str, torch.Tensor]],
                 min_count: int = 20) -> None:
    for i, expected in enumerate(ref):
        n = int(out[3][i])
        assert n == len(expected["scores"]), f"image {i}: {n} vs eager {len(expected['scores'])}"
        assert n >= min_count, f"image {i}: only {n} detections, the test needs {min_count}"
        boxes, scores, labels = out[0][i, :n], out[1][i, :n], out[2][i, :n]
        iou = box_iou(expected["boxes"], torch.from_numpy(boxes)).numpy()
        same_label = expected["labels"].numpy()[:, None] == labels[None, :]
        match = np.where(same_label, iou, -1).argmax(axis=1)
        assert len(set(match.tolist())) == n, f"image {i}: detections do not pair one to one"
        np.testing.assert_array_equal(labels[match], expected["labels"].numpy())
        np.testing.assert_allclose(boxes[match], expected["boxes"].numpy(), rtol=1e-3, atol=1e-3)
        np.testing.assert_allclose(scores[match], expected["scores"].numpy(), rtol=0, atol=1e-4)
        # padding slots follow the contract
        assert (out[2][i, n:] == -1).all() and (out[1][i, n:] == 0).all()


def _eager(model: torch.nn.Module, batch: Batch, classes: str, threshold: float
           ) -> list[dict[str, torch.Tensor]]:
    ids, _ = class_selection(classes)
    return eager_reference(model, torch.from_numpy(batch.images),
                           torch.from_numpy(batch.image_sizes), ids, 100, threshold)


@pytest.mark.parametrize("count", [1, 3])
def test_parity_with_torchvision(model, coco_onnx, images, count):
    batch, _ = preprocess(images[:count], SMALL)
    _assert_same(_run(coco_onnx, batch), _eager(model, batch, "coco", 0.05))


def test_parity_mixed_sizes(model, coco_onnx, images):
    batch, _ = preprocess([images[0], images[-1]], SMALL)  # KITTI 1242x375 and Waymo frames
    assert len({tuple(s) for s in batch.image_sizes.tolist()}) == 2
    _assert_same(_run(coco_onnx, batch), _eager(model, batch, "coco", 0.05))


def test_driving_classes_match_eager_restricted(model, images, tmp_path):
    path = _export(model, tmp_path / "driving.onnx", "driving", threshold=0.01)
    spec = validate_model(path)
    assert spec.class_names == DRIVING_CLASSES
    batch, _ = preprocess(images[:2], SMALL)
    _assert_same(_run(path, batch), _eager(model, batch, "driving", 0.01))


def test_blank_image_gives_no_detections(model, images, tmp_path):
    path = _export(model, tmp_path / "strict.onnx", "coco", threshold=0.9)
    batch, _ = preprocess(images[:1], SMALL)
    blank = Batch(np.concatenate([np.zeros_like(batch.images), batch.images]),
                  np.concatenate([batch.image_sizes, batch.image_sizes]))
    ref = _eager(model, blank, "coco", 0.9)
    out = _run(path, blank)
    assert [len(r["scores"]) for r in ref] == [0, 0]
    assert out[3].tolist() == [0, 0]
    assert (out[2] == -1).all() and (out[1] == 0).all() and (out[0] == 0).all()


def test_batch_of_four_equals_four_single_runs(coco_onnx, images):
    batch, _ = preprocess(images[:1] * 4, SMALL)
    noise = np.random.default_rng(0).integers(0, 256, batch.images.shape, dtype=np.uint8)
    batch = Batch(np.where(np.arange(4)[:, None, None, None] % 2 == 1, noise, batch.images),
                  batch.image_sizes)
    together = _run(coco_onnx, batch)
    for i in range(4):
        alone = _run(coco_onnx, Batch(batch.images[i:i + 1], batch.image_sizes[i:i + 1]))
        for a, t in zip(alone, together, strict=True):
            np.testing.assert_array_equal(a[0], t[i])


def test_contract_and_metadata(coco_onnx):
    spec = validate_model(coco_onnx)
    assert spec.resize.policy == "shortest_edge" and spec.resize.min_size == 224
    assert spec.source_weights == "random:seed=0" and len(spec.class_names) == 80
    assert spec.embedding_dim == 1280 and spec.object_embedding_dim == 1024
    assert "FPN level" in spec.embedding_method and "fc7" in spec.object_embedding_method
    assert "softmax" in spec.class_probability_method


def test_object_embeddings_are_the_box_head_rows_of_the_kept_detections(model, coco_onnx,
                                                                         images):
    """ONNX Runtime against the same module run eagerly in PyTorch on the same tensors; and
    each vector, put through the model's own classifier, gives back its detection's score,
    which shows the gather picked the row of the proposal that detection came from."""
    batch, _ = preprocess(images[:3], SMALL)
    out = _run(coco_onnx, batch)
    ids, _ = class_selection("coco")
    graph = BatchedFasterRCNN(model, ids, 0.05, 100).eval()
    with torch.inference_mode():
        eager = graph(torch.from_numpy(batch.images), torch.from_numpy(batch.image_sizes))
        objects = torch.from_numpy(out[5])
        logits = model.roi_heads.box_predictor.cls_score(objects)
        rescored = torch.softmax(logits, -1)
    scale = float(np.abs(out[5]).max())  # about 20; float sums of a 12544 -> 1024 MLP
    np.testing.assert_allclose(out[5], eager[5].numpy(), rtol=0, atol=1e-4 * scale)
    assert out[5].shape[2] == 1024
    for i in range(3):
        n = int(out[3][i])
        assert n >= 20
        class_ids = torch.tensor(ids)[torch.from_numpy(out[2][i, :n])]
        recomputed = rescored[i, torch.arange(n), class_ids].numpy()
        np.testing.assert_allclose(recomputed, out[1][i, :n], rtol=0, atol=1e-4)
        assert (out[5][i, n:] == 0).all() and np.abs(out[5][i, :n]).sum(axis=1).min() > 0
        # class probabilities: the same softmax over the model's classes, renormalised
        kept = rescored[i, :n][:, torch.tensor(ids)].numpy()
        np.testing.assert_allclose(out[6][i, :n], kept / kept.sum(axis=1, keepdims=True),
                                   rtol=0, atol=1e-4)
        np.testing.assert_allclose(out[6][i, :n].sum(axis=1), 1, atol=1e-5)
        assert (out[6][i, n:] == 0).all() and out[6].shape[2] == 80


def test_fp16_graph_agrees_with_fp32(model, coco_onnx, images, tmp_path):
    """--fp16: backbone and heads in float16, decoding, RoiAlign and NMS in float32.

    Random weights give nearly flat scores, so float16 rounding reorders some near-ties;
    the check is that nearly every float32 detection has a float16 twin.
    """
    path = _export(model, tmp_path / "fp16.onnx", "coco", fp16=True)
    spec = validate_model(path)
    assert spec.precision == "fp16" and spec.embedding_dim == 1280
    assert path.stat().st_size < 0.55 * coco_onnx.stat().st_size  # the weights are halved
    batch, _ = preprocess(images, SMALL)
    full, half = _run(coco_onnx, batch), _run(path, batch)
    for i in range(len(images)):
        n32, n16 = int(full[3][i]), int(half[3][i])
        assert n32 >= 20 and abs(n32 - n16) <= max(2, n32 // 20), (i, n32, n16)
        iou = box_iou(torch.from_numpy(full[0][i, :n32]), torch.from_numpy(half[0][i, :n16]))
        same = full[2][i, :n32, None] == half[2][i, None, :n16]
        best = np.where(same, iou.numpy(), -1).argmax(axis=1)
        twin = np.where(same, iou.numpy(), -1).max(axis=1) > 0.9
        assert twin.mean() >= 0.85, f"image {i}: {twin.mean():.2f} of detections have a twin"
        np.testing.assert_allclose(half[1][i, best[twin]], full[1][i, :n32][twin], atol=0.01)
    emb32, emb16 = full[4], half[4]
    assert np.abs(emb16 - emb32).max() <= 5e-3 * np.abs(emb32).max()
    for i in range(2):  # N=1 works too; float16 rounding may differ in the last digits
        alone = _run(path, Batch(batch.images[i:i + 1], batch.image_sizes[i:i + 1]))
        assert abs(int(alone[3][0]) - int(half[3][i])) <= 1
        np.testing.assert_allclose(alone[1][0, :10], half[1][i, :10], atol=1e-3)


def test_default_weights_offline_fail_fast_with_clear_message(tmp_path, unused_port):
    env = {"TORCH_HOME": str(tmp_path / "torch"), "PATH": "/usr/bin:/bin",
           "https_proxy": f"http://127.0.0.1:{unused_port}",
           "HTTPS_PROXY": f"http://127.0.0.1:{unused_port}"}
    proc = subprocess.run(
        [sys.executable, "-m", "pretag.cli", "export", "fasterrcnn", "--weights", "default",
         "--output", str(tmp_path / "m.onnx")],
        capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 1, proc.stderr
    assert "--weights PATH" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "m.onnx").exists()


def test_corrupt_weights_file(tmp_path):
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"this is not a checkpoint")
    with pytest.raises(ExportError, match="cannot read weights file"):
        load_fasterrcnn(str(bad))
    with pytest.raises(ExportError, match="does not exist"):
        load_fasterrcnn(str(tmp_path / "missing.pth"))
    partial = tmp_path / "partial.pth"
    torch.save({"backbone.body.conv1.weight": torch.zeros(1)}, partial)
    with pytest.raises(ExportError, match="does not fit"):
        load_fasterrcnn(str(partial))
