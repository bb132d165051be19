"""Shared preprocessing: decoding odd inputs, resizing, padding, box mapping."""

from __future__ import annotations

import io
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from pretag.contract import ResizeSpec
from pretag.preprocess import (
    ImageError,
    canvas_size,
    decode_image,
    normalize_boxes,
    pad_batch,
    preprocess,
    resize_image,
    target_size,
)

TORCHVISION = ResizeSpec("shortest_edge", min_size=800, max_size=1333)
LETTERBOX = ResizeSpec("longest_edge", max_size=416, pad_value=114, canvas=(416, 416))


def _encode(img: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _rgb(h: int = 40, w: int = 60) -> np.ndarray:
    img = np.zeros((h, w, 3), dtype=np.uint8)
    img[..., 0] = 200  # red left half, blue right half
    img[:, w // 2:, 0] = 0
    img[:, w // 2:, 2] = 200
    return img


def test_rgb_channel_order_png_and_jpeg():
    for fmt in ("PNG", "JPEG", "BMP", "WEBP", "TIFF"):
        out = decode_image(_encode(Image.fromarray(_rgb()), fmt, quality=95)
                           if fmt == "JPEG" else _encode(Image.fromarray(_rgb()), fmt))
        assert out.shape == (40, 60, 3) and out.dtype == np.uint8, fmt
        assert out[20, 5, 0] > 150 and out[20, 5, 2] < 50, fmt  # red stays red
        assert out[20, 55, 2] > 150 and out[20, 55, 0] < 50, fmt


def test_grayscale_rgba_palette_cmyk_and_16bit():
    gray = decode_image(_encode(Image.fromarray(np.full((10, 12), 77, np.uint8)), "PNG"))
    assert gray.shape == (10, 12, 3) and (gray == 77).all()
    rgba = np.dstack([_rgb(), np.full((40, 60), 128, np.uint8)])
    out = decode_image(_encode(Image.fromarray(rgba, "RGBA"), "PNG"))
    assert out.shape == (40, 60, 3) and out[20, 5, 0] == 200
    pal = decode_image(_encode(Image.fromarray(_rgb()).convert("P"), "PNG"))
    assert pal.shape == (40, 60, 3) and pal[20, 5, 0] > 150
    cmyk = decode_image(_encode(Image.fromarray(_rgb()).convert("CMYK"), "JPEG", quality=95))
    assert cmyk.shape == (40, 60, 3) and cmyk[20, 5, 0] > 150 and cmyk[20, 5, 2] < 60
    deep = np.zeros((8, 9, 3), np.uint16)
    deep[..., 0] = 65535
    deep[..., 1] = 257 * 100
    ok, png16 = cv2.imencode(".png", deep[..., ::-1])
    assert ok
    out = decode_image(png16.tobytes())
    assert out.dtype == np.uint8 and tuple(out[0, 0]) == (255, 100, 0)


def test_exif_orientation_is_applied():
    img = Image.fromarray(_rgb(40, 60))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    out = decode_image(_encode(img, "JPEG", exif=exif, quality=95))
    assert out.shape == (60, 40, 3)
    assert out[5, 20, 0] > 150 and out[55, 20, 2] > 150  # red on top after rotation


@pytest.mark.parametrize("data, reason", [
    (b"", "empty"),
    (b"hello, this is a text file\n", "not a recognised image"),
])
def test_broken_inputs(data, reason):
    with pytest.raises(ImageError, match=reason):
        decode_image(data)


def test_truncated_jpeg(shared: Path):
    data = (shared / "data" / "driving" / "nuscenes_cam_front.jpg").read_bytes()
    with pytest.raises(ImageError):
        decode_image(data[:200])


def test_max_pixels_checked_before_decoding():
    data = _encode(Image.new("L", (3000, 3000)), "PNG")
    with pytest.raises(ImageError, match="over the limit"):
        decode_image(data, max_pixels=1_000_000)
    assert decode_image(data, max_pixels=9_000_000).shape == (3000, 3000, 3)


def test_target_sizes():
    assert target_size(375, 1242, TORCHVISION) == (402, 1333)  # long side caps
    assert target_size(900, 1600, TORCHVISION) == (749, 1333)
    assert target_size(480, 640, TORCHVISION) == (800, 1066)
    assert target_size(375, 1242, LETTERBOX) == (125, 416)
    assert target_size(1, 20, LETTERBOX) == (20, 416)
    assert target_size(1, 1, LETTERBOX) == (416, 416)


def test_pad_batch_and_canvas():
    spec = ResizeSpec("shortest_edge", min_size=64, max_size=96, pad_value=7)
    a = resize_image(np.zeros((30, 40, 3), np.uint8), spec)
    b = resize_image(np.zeros((50, 20, 3), np.uint8), spec)
    batch = pad_batch([a, b], spec)
    assert batch.images.shape == (2, 3, 96, 96)  # tallest 96, widest 85 -> 96
    assert batch.image_sizes.tolist() == [[64, 85], [96, 38]]
    assert (batch.images[0, :, 64:] == 7).all() and (batch.images[0, :, :64, :85] == 0).all()
    assert canvas_size([(10, 10)], LETTERBOX) == (416, 416)


def test_normalized_boxes_map_to_original(shared: Path):
    data = (shared / "data" / "driving" / "kitti_000000.png").read_bytes()
    batch, originals = preprocess([data], TORCHVISION)
    (h, w), (vh, vw) = originals[0], batch.image_sizes[0]
    box_original = np.array([100.0, 50.0, 400.0, 300.0])
    box_input = box_original * [vw / w, vh / h, vw / w, vh / h]
    norm = normalize_boxes(box_input, (vh, vw))
    np.testing.assert_allclose(norm[0] * [w, h, w, h], box_original, rtol=1e-5)
    assert (normalize_boxes(np.array([[-5, -5, 2000, 2000]]), (vh, vw)) == [0, 0, 1, 1]).all()


def test_the_bgr_path_gives_the_same_batch_as_the_rgb_one(shared: Path):
    """The server keeps OpenCV's BGR order and flips channels while padding: one copy
    fewer per image, the same tensor."""
    from pretag.preprocess import decode_bgr

    spec = ResizeSpec("shortest_edge", min_size=320, max_size=512)
    files = sorted((shared / "data" / "driving").iterdir())[:4]
    data = [f.read_bytes() for f in files]
    rgb = pad_batch([resize_image(decode_image(d), spec) for d in data], spec)
    bgr = pad_batch([resize_image(decode_bgr(d), spec) for d in data], spec, bgr=True)
    np.testing.assert_array_equal(rgb.images, bgr.images)
    np.testing.assert_array_equal(rgb.image_sizes, bgr.image_sizes)
    batch, _ = preprocess(data, spec, reduced=False)
    np.testing.assert_array_equal(batch.images, rgb.images)
