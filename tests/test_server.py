"""The gRPC server in-process on port 0 with the real YOLOX contract model."""

from __future__ import annotations

import dataclasses
import io
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import cv2
import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from pretag.client import Client, InvalidImage, Prediction
from pretag.preprocess import normalize_boxes, preprocess
from pretag.runtime.backend import BackendConfig, OrtBackend
from pretag.server.app import BackgroundServer

MAX_PIXELS = 2_000_000


@pytest.fixture(scope="module")
def server(start_server: Callable[..., BackgroundServer]) -> BackgroundServer:
    # CPU named explicitly: the answers do not depend on which onnxruntime is installed
    return start_server(metrics_port=0, max_pixels=MAX_PIXELS, providers=("cpu",))


@pytest.fixture(scope="module")
def client(server: BackgroundServer) -> Iterator[Client]:
    with Client(f"127.0.0.1:{server.port}") as c:
        yield c


@pytest.fixture(scope="module")
def direct(yolox_model: Path):
    """The model called directly, one image per batch, no server involved."""
    backend = OrtBackend(yolox_model, BackendConfig(providers=("cpu",)))
    spec = backend.spec

    def detect(data: bytes) -> tuple[np.ndarray, list[str], np.ndarray]:
        batch, _ = preprocess([data], spec.resize)
        out = backend.run(batch)
        n = int(out.num_detections[0])
        keep = out.scores[0, :n] >= spec.score_threshold
        boxes = normalize_boxes(out.boxes[0, :n][keep], tuple(batch.image_sizes[0]))
        labels = [spec.class_names[i] for i in out.labels[0, :n][keep]]
        return boxes, labels, out.scores[0, :n][keep]

    return detect


def assert_same(pred: Prediction, expected: tuple[np.ndarray, list[str], np.ndarray]) -> None:
    boxes, labels, scores = expected
    assert pred.error is None, pred.error
    assert pred.labels == labels
    np.testing.assert_allclose(np.array(pred.boxes).reshape(-1, 4), boxes, atol=1e-5)
    np.testing.assert_allclose(pred.scores, scores, atol=1e-6)


def _images(folder: Path) -> list[Path]:
    return sorted(folder.glob("images/**/*.jpg"))


def test_detect_matches_the_model_called_directly(client: Client, coco128: Path, direct):
    for path in _images(coco128)[:12]:
        data = path.read_bytes()
        pred = client.detect(data, id=path.name)
        assert pred.id == path.name
        assert_same(pred, direct(data))
        with Image.open(path) as img:
            assert (pred.width, pred.height) == img.size
        assert pred.compute_ms > 0 and pred.batch_size >= 1


def test_stream_of_200_with_window_32_matches_direct_calls(client: Client, coco128: Path,
                                                           direct):
    paths = _images(coco128)
    assert len(paths) == 128
    items = [(f"{i}:{p.name}", p) for i, p in enumerate((paths * 2)[:200])]
    expected = {p: direct(p.read_bytes()) for p in paths}
    by_id = dict(items)
    seen: dict[str, Prediction] = {}
    batch_sizes = []
    for pred in client.detect_stream(((i, p.read_bytes()) for i, p in items), window=32):
        assert pred.id not in seen
        seen[pred.id] = pred
        batch_sizes.append(pred.batch_size)
    assert set(seen) == set(by_id)
    for item_id, pred in seen.items():
        assert_same(pred, expected[by_id[item_id]])
    assert max(batch_sizes) > 1  # the window keeps enough in flight for batches to form


def _encode_png(img: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", img)
    assert ok
    return buf.tobytes()


def _unusual_images(shared: Path) -> dict[str, bytes]:
    bgr = cv2.imread(str(shared / "data" / "driving" / "kitti_000008.png"))
    rgb = Image.fromarray(bgr[:, :, ::-1])
    out: dict[str, bytes] = {"plain": _encode_png(bgr)}
    out["16bit"] = _encode_png(bgr.astype(np.uint16) * 257)
    out["rgba"] = _encode_png(np.dstack([bgr, np.full(bgr.shape[:2], 255, np.uint8)]))
    out["gray"] = _encode_png(cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY))
    buf = io.BytesIO()
    rgb.save(buf, "JPEG", quality=95)
    out["jpeg"] = buf.getvalue()
    buf = io.BytesIO()
    rgb.convert("CMYK").save(buf, "JPEG", quality=95)
    out["cmyk"] = buf.getvalue()
    # stored rotated 90 degrees clockwise; EXIF orientation 8 turns it back upright
    exif = Image.Exif()
    exif[0x0112] = 8
    buf = io.BytesIO()
    rgb.transpose(Image.Transpose.ROTATE_270).save(buf, "JPEG", quality=95, exif=exif)
    out["exif"] = buf.getvalue()
    out["1x1"] = _encode_png(np.full((1, 1, 3), 128, np.uint8))
    out["20to1"] = _encode_png(cv2.resize(bgr, (2000, 100)))
    return out


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    inter = np.clip(np.minimum(a[2:], b[2:]) - np.maximum(a[:2], b[:2]), 0, None).prod()
    area = (a[2:] - a[:2]).prod() + (b[2:] - b[:2]).prod()
    return float(inter / (area - inter))


def _broken_images(shared: Path) -> dict[str, bytes]:
    jpeg = (shared / "data" / "driving" / "nuscenes_cam_front.jpg").read_bytes()
    big = _encode_png(np.zeros((1100, 2000, 3), np.uint8))  # 2.2 M pixels > MAX_PIXELS
    return {"empty": b"", "truncated": jpeg[: len(jpeg) // 3], "text": b"hello, not an image\n",
            "too_big": big}


def test_broken_and_unusual_inputs_in_one_stream(client: Client, shared: Path, direct,
                                                 server: BackgroundServer):
    unusual = _unusual_images(shared)
    broken = _broken_images(shared)
    good = {f"good{i}": p.read_bytes()
            for i, p in enumerate(sorted((shared / "data" / "driving").iterdir())[:4])}
    items = [*unusual.items(), *broken.items(), *good.items()]
    results = {p.id: p for p in client.detect_stream(items, window=8)}
    assert set(results) == {k for k, _ in items}
    for name in broken:
        err = results[name].error
        assert isinstance(err, InvalidImage) and err.code == grpc.StatusCode.INVALID_ARGUMENT
        assert repr(name) in str(err)
    assert "over the limit" in str(results["too_big"].error)
    for name, data in [*good.items(), *unusual.items()]:
        assert_same(results[name], direct(data))
    plain = results["plain"]
    assert len(plain.labels) >= 3 and "car" in plain.labels
    for name in ("16bit", "rgba"):  # lossless variants: exactly the same answer
        assert results[name].labels == plain.labels
        np.testing.assert_allclose(results[name].boxes, plain.boxes, atol=1e-6)
    for name in ("gray", "cmyk", "exif", "jpeg"):  # the main object is found in the same place
        pred = results[name]
        assert (pred.width, pred.height) == (plain.width, plain.height)
        top = np.array(plain.boxes[0])
        assert max(_iou(top, np.array(b)) for b in pred.boxes) > 0.8, name
    assert (results["1x1"].width, results["1x1"].height) == (1, 1)
    assert (results["20to1"].width, results["20to1"].height) == (2000, 100)
    # the server is still up and well
    assert client.detect(good["good0"]).error is None


def test_unary_detect_reports_invalid_argument_with_the_id(client: Client):
    with pytest.raises(InvalidImage, match=r"'broken\.jpg'"):
        client.detect(b"\xff\xd8\xff\xe0 not really", id="broken.jpg")


def test_model_info(client: Client):
    info = client.model_info()
    assert list(info.class_names) == ["bicycle", "bus", "car", "motorcycle", "person", "train",
                                      "truck"]
    assert info.contract_version == "1" and info.precision == "fp32"
    assert list(info.providers) == ["CPUExecutionProvider"]
    assert info.batching.max_batch_size == 8 and info.batching.max_queue == 256
    assert info.max_message_bytes == 64 * 2**20
    assert info.min_score_threshold == pytest.approx(0.05)  # the YOLOX export's in-graph floor


def test_metrics_bind_the_grpc_host_unless_told_otherwise(server: BackgroundServer):
    assert server.server is not None and server.server.metrics._http is not None
    assert server.server.metrics._http.server_address[0] == "127.0.0.1"
    config = server.config
    assert dataclasses.replace(config, host="[::]").metrics_address() == "::"
    assert dataclasses.replace(config, metrics_host="0.0.0.0").metrics_address() == "0.0.0.0"


def test_health_and_reflection(server: BackgroundServer):
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "pretag.v1.Pretagger", "inference.GRPCInferenceService"):
            status = health.Check(health_pb2.HealthCheckRequest(service=service)).status
            assert status == health_pb2.HealthCheckResponse.SERVING
        db = ProtoReflectionDescriptorDatabase(channel)
        services = set(db.get_services())
        assert {"pretag.v1.Pretagger", "inference.GRPCInferenceService",
                "grpc.health.v1.Health"} <= services
        desc = db.FindFileContainingSymbol("pretag.v1.Pretagger")
        assert "DetectStream" in [m.name for m in desc.service[0].method]


def test_metrics_endpoint_is_scraped_and_parsed(server: BackgroundServer, client: Client,
                                                coco128: Path):
    def scrape() -> dict[str, float]:
        url = f"http://127.0.0.1:{server.metrics_port}/metrics"
        text = urllib.request.urlopen(url, timeout=10).read().decode()
        values = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
                values[f"{sample.name}{{{labels}}}"] = sample.value
        return values

    before = scrape()
    data = _images(coco128)[5].read_bytes()
    for _ in range(3):
        client.detect(data)
    with pytest.raises(InvalidImage):
        client.detect(b"")
    after = scrape()

    def delta(key: str) -> float:
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert delta("pretag_requests_total{code=OK,method=Detect}") == 3
    assert delta("pretag_requests_total{code=INVALID_ARGUMENT,method=Detect}") == 1
    assert delta("pretag_batch_size_count{}") == 3
    assert delta("pretag_queue_seconds_count{}") == 3
    assert after["pretag_compute_seconds_sum{}"] > before.get("pretag_compute_seconds_sum{}", 0)
    assert after["pretag_pending_requests{}"] == 0
    assert after["pretag_images_per_second{}"] > 0



def test_raw_pixels_detect_as_the_same_image_file(client: Client, coco128: Path, direct,
                                                  server: BackgroundServer):
    """DetectRequest.raw (a video frame's transport): BGR or RGB, full size or resized for
    the model beforehand, the detections of the encoded file; sizes that disagree are
    INVALID_ARGUMENT naming the request."""
    import grpc

    from pretag.contract import ResizeSpec
    from pretag.preprocess import Pixels, decode_bgr, resize_image
    from pretag.v1 import pretag_pb2 as pb
    from pretag.v1 import pretag_pb2_grpc as pb_grpc

    for path in _images(coco128)[:4]:
        data = path.read_bytes()
        bgr = decode_bgr(data)
        full = client.detect(Pixels(bgr), id="full")
        assert_same(full, direct(data))
        resize = ResizeSpec.from_json(client.model_info().resize_json)
        small = client.detect(Pixels(resize_image(bgr, resize), bgr.shape[:2]), id="small")
        assert_same(small, direct(data))
        assert (small.width, small.height) == (bgr.shape[1], bgr.shape[0])
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = pb_grpc.PretaggerStub(channel)
            rgb = np.ascontiguousarray(bgr[:, :, ::-1])
            answer = stub.Detect(pb.DetectRequest(id="rgb", raw=pb.RawImage(
                pixels=rgb.tobytes(), height=rgb.shape[0], width=rgb.shape[1],
                format=pb.PIXEL_FORMAT_RGB24)))
            assert [d.label for d in answer.detections] == full.labels
            with pytest.raises(grpc.RpcError) as refused:
                stub.Detect(pb.DetectRequest(id="short", raw=pb.RawImage(
                    pixels=b"\0" * 10, height=4, width=4)))
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "short" in refused.value.details() and "48" in refused.value.details()
