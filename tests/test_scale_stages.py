"""The Ray pipeline's stages as plain functions (no cluster): what each one does with good
images, unreadable and broken files, and an output it cannot write to."""

from __future__ import annotations

import hashlib
from pathlib import Path

import cv2
import numpy as np
import pytest

from pretag.job.outputs import prediction_path
from pretag.runtime.backend import BackendConfig
from pretag.scale.stages import Detector, DetectorConfig, WriteConfig, read_images, write_block


def _rows(paths: list[Path], start: int = 0) -> dict[str, np.ndarray]:
    return {"index": np.arange(start, start + len(paths)),
            "name": np.array([p.name for p in paths], dtype=object),
            "path": np.array([str(p) for p in paths], dtype=object)}


@pytest.fixture(scope="module")
def detector(yolox_model: Path) -> Detector:
    return Detector(yolox_model.read_bytes(),
                    DetectorConfig(0.5, batch_size=2, backend=BackendConfig(threads=1)))


def test_read_keeps_failures_as_rows_with_the_servers_codes(detector: Detector, coco128: Path,
                                                           tmp_path: Path):
    good = sorted((coco128 / "images").glob("*.jpg"))[0]
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"no image here")
    batch = read_images(_rows([good, tmp_path / "missing.jpg", broken]),
                        detector.spec.resize, 100_000_000)
    assert list(batch["code"]) == ["", "READ", "INVALID_ARGUMENT"]
    assert batch["reason"][2].startswith("request 'broken.jpg': ")  # as the server says it
    assert max(batch["image"][0].shape[:2]) == 416 and batch["image"][1].size == 0
    assert tuple(batch["original"][0]) == cv2.imread(str(good)).shape[:2]


def test_detect_then_write_one_block(detector: Detector, coco128: Path, tmp_path: Path):
    paths = sorted((coco128 / "images").glob("*.jpg"))[:5]
    found = detector(read_images(_rows(paths, start=100), detector.spec.resize, 100_000_000))
    assert "image" not in found and len(found["boxes"]) == 5
    config = WriteConfig(str(tmp_path), detector.spec.class_names, "image", first_shard=7)
    done = write_block(found, config)
    assert list(done["code"]) == [""] * 5
    assert all(prediction_path(tmp_path, p.name).is_file() for p in paths)
    shard = tmp_path / ".lightly" / "embeddings" / "lightly_pretagging" / "images-000107.parquet"
    assert shard.is_file()  # numbered from the block's first image: unique across blocks


def test_an_output_that_cannot_be_written_fails_each_image_not_the_task(
        detector: Detector, coco128: Path, tmp_path: Path):
    paths = sorted((coco128 / "images").glob("*.jpg"))[:2]
    found = detector(read_images(_rows(paths), detector.spec.resize, 100_000_000))
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    done = write_block(found, WriteConfig(str(blocker / "out"), detector.spec.class_names,
                                          "none", 1))
    assert list(done["code"]) == ["WRITE", "WRITE"]
    assert all("cannot write prediction" in r for r in done["reason"])


def test_the_model_file_is_named_by_its_content(tmp_path: Path):
    from pretag.scale.stages import model_file

    first = model_file(b"model bytes", tmp_path)
    assert first.name == f"{hashlib.sha256(b'model bytes').hexdigest()}.onnx"
    mtime = first.stat().st_mtime_ns
    assert model_file(b"model bytes", tmp_path) == first and first.stat().st_mtime_ns == mtime
    assert model_file(b"other", tmp_path) != first and len(list(tmp_path.iterdir())) == 2
