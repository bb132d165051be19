"""Pixel health metrics on real frames and on frames broken here: Lightly's uniformRowRatio
and the pixel metadata (pretag.health)."""

from __future__ import annotations

import io
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image, ImageFile

from pretag.health import (
    DEFAULT_MAX_UNIFORM_ROW_RATIO,
    METADATA_KEYS,
    pixel_metadata,
    uniform_row_ratio,
)


def _grey(image: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)


@pytest.fixture(scope="module")
def frames(shared: Path) -> dict[str, np.ndarray]:
    return {p.name: cv2.imread(str(p)) for p in sorted((shared / "data" / "driving").iterdir())}


def test_real_frames_score_as_content(frames: dict[str, np.ndarray]):
    scores = {name: uniform_row_ratio(_grey(img)) for name, img in frames.items()}
    assert len(scores) == 11
    assert all(s <= DEFAULT_MAX_UNIFORM_ROW_RATIO for s in scores.values()), scores


def test_blank_and_half_grey_frames_score_as_broken(frames: dict[str, np.ndarray]):
    image = frames["nuscenes_cam_front.jpg"]
    height = image.shape[0]
    half = image.copy()
    half[height // 2:] = 128  # a decoder that gave up half way fills grey
    assert uniform_row_ratio(_grey(np.full_like(image, 128))) == 1.0
    assert uniform_row_ratio(_grey(half)) == pytest.approx(0.5, abs=0.01)
    # A JPEG cut short: OpenCV 4.12 refuses it (a decode error, reported as corrupt),
    # while a decoder that conceals (Pillow with LOAD_TRUNCATED_IMAGES, FFmpeg for a video
    # frame) fills the missing rows with one value.
    encoded = cv2.imencode(".jpg", image)[1].tobytes()
    raw = encoded[:len(encoded) // 2]
    assert cv2.imdecode(np.frombuffer(raw, np.uint8), cv2.IMREAD_COLOR) is None
    ImageFile.LOAD_TRUNCATED_IMAGES = True
    try:
        concealed = np.asarray(Image.open(io.BytesIO(raw)).convert("L"))
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = False
    assert uniform_row_ratio(concealed) > DEFAULT_MAX_UNIFORM_ROW_RATIO

def test_the_ratio_follows_lightlys_definition():
    """Rows at most 400 after resizing; a row counts when > 97% of its pixels have a
    Laplacian within +-5/255; images under 3 px on a side score 0."""
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (100, 60), dtype=np.uint8)
    assert uniform_row_ratio(image) == 0.0
    image[10:30] = 7  # 20 flat rows: 18 of them flat in their 3x3 neighbourhood too
    assert uniform_row_ratio(image) == pytest.approx(18 / 98)
    assert uniform_row_ratio(np.zeros((2, 50), np.uint8)) == 0.0
    tall = np.zeros((2000, 30), np.uint8)
    tall[:1000] = rng.integers(0, 255, (1000, 30), dtype=np.uint8)
    assert uniform_row_ratio(tall) == pytest.approx(0.5, abs=0.01)


def test_pixel_metadata(frames: dict[str, np.ndarray]):
    red = np.zeros((50, 80, 3), np.uint8)
    red[..., 2] = 255
    meta = pixel_metadata(red)
    assert tuple(meta) == METADATA_KEYS
    assert (meta["width"], meta["height"]) == (80, 50)
    assert (meta["meanRed"], meta["meanGreen"], meta["meanBlue"]) == (255, 0, 0)
    assert meta["contrast"] == 0 and meta["sharpness"] == 0 and meta["uniformRowRatio"] == 1
    real = frames["nuscenes_cam_front.jpg"]
    sharp = pixel_metadata(real, original=(900, 1600))
    blurred = pixel_metadata(cv2.GaussianBlur(real, (9, 9), 3))
    assert (sharp["width"], sharp["height"]) == (1600, 900)
    assert sharp["sharpness"] > 4 * blurred["sharpness"] > 0
    assert 20 < sharp["contrast"] < 128 and sharp["uniformRowRatio"] == 0


def test_the_ratio_matches_a_torch_transcription_of_lightlys_steps(shared: Path):
    """Lightly's steps as its port writes them (torchvision resize without antialiasing,
    float conv2d, strict +-5/255), transcribed here, against pretag's OpenCV version on
    real frames at their full size and on broken ones."""
    import torch
    import torch.nn.functional as F
    from torchvision.transforms import functional as TF

    kernel = torch.tensor([[-1.0, -1, -1], [-1, 8, -1], [-1, -1, -1]]).view(1, 1, 3, 3)

    def reference(grey: np.ndarray) -> float:
        tensor = torch.from_numpy(grey).float().div(255).unsqueeze(0)
        height, width = grey.shape
        if height > 400:
            shrink = 400 / height
            tensor = TF.resize(tensor, [int(height * shrink), max(3, int(width * shrink))],
                               antialias=False)
        response = F.conv2d(tensor.unsqueeze(0), kernel).squeeze(0)
        uniform = ((response > -5 / 255) & (response < 5 / 255)).float()
        return float((uniform.mean(dim=2) > 0.97).float().mean())

    paths = sorted((shared / "data" / "driving").iterdir()) + \
        sorted((shared / "data" / "coco128" / "images").rglob("*.jpg"))[:20]
    greys = [_grey(cv2.imread(str(p))) for p in paths]
    half = greys[3].copy()
    half[half.shape[0] // 2:] = 128
    stripes = np.tile(np.repeat([[40], [200]], 10, axis=0), (30, 500)).astype(np.uint8)
    for grey in [*greys, half, np.full_like(half, 128), stripes]:
        assert uniform_row_ratio(grey) == pytest.approx(reference(grey), abs=0.01)
