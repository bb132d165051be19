"""Image preprocessing shared by the server, the client and the tests.

decode -> RGB uint8 (EXIF orientation applied; grayscale, RGBA, palette, CMYK
and 16-bit converted) -> resize per the model's :class:`ResizeSpec` -> pad a
batch to a common canvas -> run -> map boxes back to [0, 1] of the original.
"""

from __future__ import annotations

import io
import math
import threading
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError

from pretag.contract import ResizeSpec
from pretag.health import pixel_metadata

DEFAULT_MAX_PIXELS = 100_000_000
#: Memory that decodes running at once may take (the server's --decode-memory-mb).
DEFAULT_DECODE_MEMORY_MB = 1024

# cv2 refuses larger images itself; our own, configurable guard runs before it.
Image.MAX_IMAGE_PIXELS = None


class ImageError(ValueError):
    """An input could not be turned into an image; the message says why."""


@dataclass(frozen=True)
class ImageHeader:
    """What the file header says, read without decoding pixels."""

    width: int
    height: int
    bytes_per_sample: int  # 1 for 8-bit images, 2 for 16-bit, 4 for 32-bit
    format: str = ""  # Pillow's name for the format: "JPEG", "PNG", ...

    @property
    def decode_bytes(self) -> int:
        """Peak memory of :func:`decode_image` for this image: twice the decoded array.

        Measured with OpenCV 4.x: ``imdecode`` of a PNG peaks at twice its result, and
        the colour swap takes a temporary of the 8-bit image; the 8-bit copy of a 16-bit
        image (half its size) is made after the decoder's temporary is gone.
        """
        return 2 * self.width * self.height * 3 * self.bytes_per_sample


def _bytes_per_sample(img: Image.Image) -> int:
    rawmodes = " ".join(str(t[3]) for t in getattr(img, "tile", []) or [] if len(t) > 3)
    if img.mode in ("I", "F") or "32" in rawmodes:
        return 4
    if img.mode.startswith("I;16") or "16" in rawmodes:
        return 2
    return 1


def read_header(data: bytes) -> ImageHeader:
    """Size and sample depth from the file header alone."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            return ImageHeader(img.size[0], img.size[1], _bytes_per_sample(img),
                               img.format or "")
    except UnidentifiedImageError:
        raise ImageError("not a recognised image format") from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise ImageError(f"unreadable image header: {exc}") from None


def image_size(data: bytes) -> tuple[int, int]:
    """(width, height) from the file header alone, without decoding pixels."""
    header = read_header(data)
    return header.width, header.height


def check_header(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> ImageHeader:
    """The header of a non-empty image within ``max_pixels``; ImageError otherwise."""
    if not data:
        raise ImageError("empty input")
    header = read_header(data)
    pixels = header.width * header.height
    if pixels > max_pixels:
        raise ImageError(f"image is {header.width}x{header.height} = {pixels} pixels, over "
                         f"the limit of {max_pixels}")
    return header


#: libjpeg-turbo's DCT scaling as OpenCV exposes it: decode at 1/factor of the size.
_REDUCED = {1: cv2.IMREAD_COLOR | cv2.IMREAD_ANYDEPTH, 2: cv2.IMREAD_REDUCED_COLOR_2,
            4: cv2.IMREAD_REDUCED_COLOR_4, 8: cv2.IMREAD_REDUCED_COLOR_8}


def reduction(header: ImageHeader, spec: ResizeSpec) -> int:
    """The largest JPEG decode scale 1/8, 1/4 or 1/2 whose result is still at least the
    model's input size on both sides (so only a downscale follows); 1 where none is, and
    for every other format (their decoders have no reduced mode; OpenCV's flag would
    decode in full and resize)."""
    if header.format != "JPEG" or header.bytes_per_sample != 1:
        return 1
    height, width = target_size(header.height, header.width, spec)
    for factor in (8, 4, 2):  # libjpeg rounds up; floor keeps the check safe
        if header.height // factor >= height and header.width // factor >= width:
            return factor
    return 1


def decode_bgr(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS,
               header: ImageHeader | None = None, factor: int = 1) -> np.ndarray:
    """Decode an encoded image into a BGR uint8 array [H, W, 3] (OpenCV's order).

    Raises :class:`ImageError` for empty, unrecognised, truncated or oversized
    inputs. ``max_pixels`` is checked on the header before any pixel is decoded.
    Peak memory is :attr:`ImageHeader.decode_bytes`: 16-bit samples are scaled to
    8 bits in one pass, with no wider copies. The server keeps BGR until
    :func:`pad_batch` (``bgr=True``) flips channels in the copy it makes anyway.
    ``header``: what :func:`check_header` already returned for ``data`` (not read again).
    ``factor``: decode a JPEG at 1/2, 1/4 or 1/8 of its size (:func:`reduction`).
    """
    if header is None:
        check_header(data, max_pixels)
    buf = np.frombuffer(data, dtype=np.uint8)
    # IMREAD_COLOR applies EXIF orientation and converts gray/RGBA/CMYK to 3 channels;
    # ANYDEPTH keeps 16-bit samples so they can be scaled rather than truncated.
    img = cv2.imdecode(buf, _REDUCED[factor])
    if img is None:
        raise ImageError("image data is corrupt or truncated")
    if img.dtype == np.uint16:
        img = cv2.convertScaleAbs(img, alpha=1 / 257)  # == (x + 128) // 257 for every x
    elif img.dtype != np.uint8:
        img = np.clip(img, 0, 255).astype(np.uint8)
    if img.shape[0] * img.shape[1] == 0:
        raise ImageError("image has no pixels")
    return img


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode an encoded image into an RGB uint8 array [H, W, 3]; see :func:`decode_bgr`."""
    img = decode_bgr(data, max_pixels)
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB, dst=img)


class DecodeBudget:
    """Bounds the memory of decodes running at once, first come first served.

    A decode reserves its :attr:`ImageHeader.decode_bytes` and waits until it fits
    under ``limit_bytes`` beside those running; one larger than the limit runs alone.
    """

    def __init__(self, limit_bytes: int) -> None:
        if limit_bytes < 1:
            raise ValueError("the decode memory budget must be positive")
        self.limit_bytes = limit_bytes
        self.used = 0
        self.peak = 0
        self._cond = threading.Condition()
        self._waiting: deque[object] = deque()

    @property
    def waiting(self) -> int:
        """Decodes waiting for room."""
        with self._cond:
            return len(self._waiting)

    @contextmanager
    def reserve(self, nbytes: int) -> Iterator[None]:
        ticket = object()
        with self._cond:
            self._waiting.append(ticket)
            self._cond.wait_for(lambda: self._waiting[0] is ticket and (
                self.used == 0 or self.used + nbytes <= self.limit_bytes))
            self._waiting.popleft()
            self.used += nbytes
            self.peak = max(self.peak, self.used)
            self._cond.notify_all()
        try:
            yield
        finally:
            with self._cond:
                self.used -= nbytes
                self._cond.notify_all()


def prepare(data: bytes, resize: ResizeSpec, max_pixels: int = DEFAULT_MAX_PIXELS,
            budget: DecodeBudget | None = None, reduced: bool = True
            ) -> tuple[np.ndarray, tuple[int, int]]:
    """The one image-preparation step of every executor: header check (size limits before
    any pixel is decoded), decode within ``budget``, resize to the model's canvas.
    ``reduced``: a JPEG larger than the canvas is decoded at 1/2, 1/4 or 1/8 of its size
    where that still covers the canvas (:func:`reduction`; 2-2.9x the full decode + resize
    of a 1600x900 frame for a 640 canvas, benchmarks/RESULTS.md), then resized to exactly
    the size a full decode would be resized to.
    Returns the resized BGR image and the original (height, width); ImageError."""
    image, original, _ = prepare_inspected(data, resize, max_pixels, budget, reduced,
                                           metadata=False)
    return image, original


def prepare_inspected(data: bytes, resize: ResizeSpec, max_pixels: int = DEFAULT_MAX_PIXELS,
                      budget: DecodeBudget | None = None, reduced: bool = True,
                      metadata: bool = True
                      ) -> tuple[np.ndarray, tuple[int, int], dict[str, float] | None]:
    """:func:`prepare`, and with ``metadata`` the image's pixel metadata
    (:func:`pretag.health.pixel_metadata`) from the decoded pixels before the resize."""
    header = check_header(data, max_pixels)
    factor = reduction(header, resize) if reduced else 1
    if budget is None:
        return _decode_resize(data, max_pixels, header, factor, resize, metadata)
    with budget.reserve(header.decode_bytes):
        return _decode_resize(data, max_pixels, header, factor, resize, metadata)


def _decode_resize(data: bytes, max_pixels: int, header: ImageHeader, factor: int,
                   resize: ResizeSpec, metadata: bool
                   ) -> tuple[np.ndarray, tuple[int, int], dict[str, float] | None]:
    image = decode_bgr(data, max_pixels, header, factor)
    height, width = image.shape[0], image.shape[1]
    if factor != 1:
        # The decoder applied EXIF orientation: a side-swapping one turns the header's size.
        height, width = header.height, header.width
        if abs(image.shape[0] - math.ceil(height / factor)) > 1 or \
                abs(image.shape[1] - math.ceil(width / factor)) > 1:
            height, width = width, height
    meta = pixel_metadata(image, (height, width)) if metadata else None
    return resize_image(image, resize, (height, width)), (height, width), meta


@dataclass(frozen=True)
class Pixels:
    """Decoded pixels in place of an encoded file (a video frame): BGR uint8 [h, w, 3],
    resized for the model already when ``original`` (height, width) is given."""

    image: np.ndarray
    original: tuple[int, int] | None = None


def prepare_pixels(pixels: Pixels, resize: ResizeSpec, max_pixels: int = DEFAULT_MAX_PIXELS
                   ) -> tuple[np.ndarray, tuple[int, int]]:
    """:func:`prepare` for pixels: sizes checked, resized unless they already are what
    ``resize`` makes of ``original``. Returns the resized BGR image and the original size."""
    image = pixels.image
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ImageError(f"pixels must be uint8 [height, width, 3], not {image.dtype} "
                         f"{list(image.shape)}")
    height, width = image.shape[:2]
    original = pixels.original or (height, width)
    for what, (h, w) in (("pixels", (height, width)), ("original", original)):
        if h * w == 0:
            raise ImageError(f"{what} have no pixels ({h}x{w})")
        if h * w > max_pixels:
            raise ImageError(f"{what} of {w}x{h} = {h * w:,} pixels exceed the "
                             f"{max_pixels:,} limit")
    if pixels.original is not None and \
            target_size(original[0], original[1], resize) == (height, width):
        return image, original
    return resize_image(image, resize), original


def target_size(height: int, width: int, spec: ResizeSpec) -> tuple[int, int]:
    """(height, width) an image of this size is resized to under ``spec``."""
    if spec.policy == "shortest_edge":
        scale = min(spec.min_size / min(height, width), spec.max_size / max(height, width))
    else:
        scale = spec.max_size / max(height, width)
    return max(1, int(height * scale)), max(1, int(width * scale))


def resize_image(img: np.ndarray, spec: ResizeSpec,
                 original: tuple[int, int] | None = None) -> np.ndarray:
    """Resize an [H, W, 3] image (RGB or BGR) as the model expects (bilinear). ``original``
    (height, width): the size the image stands for, when it was decoded at a reduced scale:
    the result is what the full image would be resized to."""
    height, width = original or (img.shape[0], img.shape[1])
    new_h, new_w = target_size(height, width, spec)
    if (new_h, new_w) == img.shape[:2]:
        return img
    return cv2.resize(img, (new_w, new_h), interpolation=cv2.INTER_LINEAR)


def canvas_size(sizes: list[tuple[int, int]], spec: ResizeSpec) -> tuple[int, int]:
    """The padded (height, width) holding every (height, width) in ``sizes``."""
    if spec.canvas is not None:
        return spec.canvas
    m = spec.size_multiple
    height = max(h for h, _ in sizes)
    width = max(w for _, w in sizes)
    return math.ceil(height / m) * m, math.ceil(width / m) * m


@dataclass(frozen=True)
class Batch:
    """A padded batch ready for the graph's two inputs."""

    images: np.ndarray  # uint8 [N, 3, H, W]
    image_sizes: np.ndarray  # int64 [N, 2], valid (height, width)


def pad_batch(images: list[np.ndarray], spec: ResizeSpec, bgr: bool = False) -> Batch:
    """Stack resized [h, w, 3] images into one padded RGB NCHW batch.

    ``bgr``: the images are in OpenCV's BGR order; channels are flipped in the same
    copy that moves them to CHW, so no separate colour conversion is needed.
    """
    if not images:
        raise ValueError("pad_batch needs at least one image")
    sizes = [(img.shape[0], img.shape[1]) for img in images]
    height, width = canvas_size(sizes, spec)
    out = np.full((len(images), 3, height, width), spec.pad_value, dtype=np.uint8)
    for i, img in enumerate(images):
        h, w = img.shape[:2]
        if h > height or w > width:
            raise ValueError(f"image {h}x{w} does not fit the {height}x{width} canvas")
        chw = img.transpose(2, 0, 1)
        out[i, :, :h, :w] = chw[::-1] if bgr else chw
    return Batch(out, np.asarray(sizes, dtype=np.int64).reshape(-1, 2))


def normalize_boxes(boxes: np.ndarray, valid_size: tuple[int, int]) -> np.ndarray:
    """Map boxes in resized-input pixels to [0, 1] of the original image.

    Resizing is a pure per-axis scale of the whole image, so dividing by the
    valid (height, width) of the resized image gives the normalised coordinates.
    """
    h, w = valid_size
    scale = np.array([w, h, w, h], dtype=np.float32)
    return np.clip(np.asarray(boxes, dtype=np.float32).reshape(-1, 4) / scale, 0.0, 1.0)


def preprocess(data_list: list[bytes], spec: ResizeSpec, max_pixels: int = DEFAULT_MAX_PIXELS,
               reduced: bool = True) -> tuple[Batch, list[tuple[int, int]]]:
    """Decode, resize and pad encoded images as the server does (:func:`prepare`); also
    returns the original (h, w) of each. ``reduced=False``: every image decoded in full."""
    prepared = [prepare(d, spec, max_pixels, reduced=reduced) for d in data_list]
    return pad_batch([image for image, _ in prepared], spec, bgr=True), \
        [original for _, original in prepared]
