"""How far a near-duplicate lies from its original, with a model's image vectors: the
figures behind ``pretag run --near-duplicate-distance`` (0.02 for YOLOX-Nano).

Originals: coco128 and the driving frames. Copies made here: JPEG re-encoded at quality 70,
halved in size, shifted 8 px (rolled), cropped to the central 90%. For each kind, the
cosine distance between each copy's vector and its original's; for the originals, the
distance to the nearest other original; and per candidate threshold, the share of copies
within it and the number of originals with a distinct image within it.

    python benchmarks/neardup_calibration.py MODEL.onnx ../shared
"""

from __future__ import annotations

import sys
from pathlib import Path

import cv2
import numpy as np

from pretag.preprocess import preprocess
from pretag.runtime.backend import OrtBackend


def vectors(backend: OrtBackend, images: list[bytes]) -> np.ndarray:
    rows = []
    for data in images:
        batch, _ = preprocess([data], backend.spec.resize)
        out = backend.run(batch).embeddings
        assert out is not None, "the model gives no image vectors"
        rows.append(out[0])
    v = np.array(rows, np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _jpeg(image: np.ndarray, quality: int = 90) -> bytes:
    return cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, quality])[1].tobytes()


def copies(image: np.ndarray) -> dict[str, bytes]:
    h, w = image.shape[:2]
    return {"re-encoded q70": _jpeg(image, 70),
            "half size": _jpeg(cv2.resize(image, (w // 2, h // 2))),
            "shifted 8 px": _jpeg(np.roll(image, 8, axis=1)),
            "central 90%": _jpeg(image[h // 20:h - h // 20, w // 20:w - w // 20])}


def main() -> None:
    model, shared = Path(sys.argv[1]), Path(sys.argv[2] if len(sys.argv) > 2 else "../shared")
    backend = OrtBackend(model)
    paths = sorted((shared / "data" / "coco128").rglob("*.jpg")) + \
        sorted((shared / "data" / "driving").iterdir())
    originals = vectors(backend, [p.read_bytes() for p in paths])
    made = [copies(cv2.imread(str(p))) for p in paths]
    sims = originals @ originals.T
    np.fill_diagonal(sims, -1)
    nearest = 1 - sims.max(axis=1)
    print(f"{len(paths)} originals; nearest other original: min {nearest.min():.4f}, "
          f"5th percentile {np.percentile(nearest, 5):.4f}, median {np.median(nearest):.4f}")
    distances = {}
    for kind in made[0]:
        copy = vectors(backend, [m[kind] for m in made])
        distances[kind] = 1 - np.sum(originals * copy, axis=1)
        d = distances[kind]
        print(f"{kind}: median {np.median(d):.4f}, 95th percentile {np.percentile(d, 95):.4f}, "
              f"max {d.max():.4f}")
    print("| distance | originals with a distinct image within | " +
          " | ".join(f"{k} within" for k in distances) + " |")
    print("|---:|---:|" + "---:|" * len(distances))
    for t in (0.01, 0.015, 0.02, 0.025):
        shares = " | ".join(f"{(d <= t).mean():.0%}" for d in distances.values())
        print(f"| {t} | {(nearest <= t).sum()} of {len(paths)} | {shares} |")


if __name__ == "__main__":
    main()
