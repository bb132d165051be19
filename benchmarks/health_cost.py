"""What the pixel metadata (pretag.health) adds to the read path, per image, one thread.

For each set and canvas: milliseconds per image of pretag's read path (decode at the
reduced JPEG scale where it applies, resize) without and with the metadata computed from
the decoded pixels, alternated over 5 rounds of about 200 images, median. Prints a
markdown table.

    python benchmarks/health_cost.py ../shared
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import cv2

from pretag.contract import ResizeSpec
from pretag.preprocess import prepare_inspected


def per_image_ms(files: list[bytes], spec: ResizeSpec, metadata: bool, reps: int) -> float:
    start = time.perf_counter()
    for _ in range(reps):
        for data in files:
            prepare_inspected(data, spec, metadata=metadata)
    return (time.perf_counter() - start) / (reps * len(files)) * 1000


def main() -> None:
    shared = Path(sys.argv[1] if len(sys.argv) > 1 else "../shared")
    driving = shared / "data" / "driving"
    sets = {"nuScenes JPEG 1600x900": sorted(driving.glob("nuscenes*.jpg")),
            "KITTI/Waymo PNG": sorted(driving.glob("*.png")),
            "coco128 JPEG (<= 640 px)": sorted((shared / "data" / "coco128").rglob("*.jpg"))}
    cv2.setNumThreads(1)
    print("| images | canvas | read path ms | with metadata ms | metadata ms | share |")
    print("|---|---:|---:|---:|---:|---:|")
    for size in (416, 640):
        spec = ResizeSpec("longest_edge", max_size=size, pad_value=114, canvas=(size, size))
        for name, paths in sets.items():
            files = [p.read_bytes() for p in paths]
            reps = max(1, 200 // len(files))
            rounds: dict[bool, list[float]] = {False: [], True: []}
            for _ in range(5):
                for metadata in (False, True):
                    rounds[metadata].append(per_image_ms(files, spec, metadata, reps))
            plain, full = statistics.median(rounds[False]), statistics.median(rounds[True])
            print(f"| {name} | {size} | {plain:.2f} | {full:.2f} | {full - plain:.2f} | "
                  f"{(full - plain) / plain:.0%} |", flush=True)


if __name__ == "__main__":
    main()
