"""Preprocessing per image, the server's old path (decode to RGB, resize, pad) against
its current one (decode BGR, resize, pad with the channel flip), alternated round by
round in one process over the same encoded images. Prints a markdown table.

    python benchmarks/preprocess_paths.py ../shared/data [--rounds 5]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from pretag.contract import ResizeSpec
from pretag.preprocess import decode_bgr, decode_image, pad_batch, resize_image

SPECS = {"YOLOX 416 letterbox": ResizeSpec("longest_edge", max_size=416, pad_value=114,
                                           canvas=(416, 416)),
         "Faster R-CNN 800/1333": ResizeSpec("shortest_edge", min_size=800, max_size=1333)}


def rgb_path(data: bytes, spec: ResizeSpec) -> None:
    pad_batch([resize_image(decode_image(data), spec)], spec)


def bgr_path(data: bytes, spec: ResizeSpec) -> None:
    pad_batch([resize_image(decode_bgr(data), spec)], spec, bgr=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("folder", type=Path)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    files = sorted(p for p in args.folder.rglob("*") if p.suffix.lower() in (".jpg", ".png"))
    data = [p.read_bytes() for p in files]
    print(f"{len(data)} images under {args.folder}, {args.rounds} rounds, median ms/image\n")
    print("| resize | RGB then CHW (before) | BGR flipped in the CHW copy (now) | ratio |")
    print("| --- | --- | --- | --- |")
    for name, spec in SPECS.items():
        times: dict[str, list[float]] = {"rgb": [], "bgr": []}
        for _ in range(args.rounds):
            for key, path in (("rgb", rgb_path), ("bgr", bgr_path)):
                start = time.perf_counter()
                for d in data:
                    path(d, spec)
                times[key].append((time.perf_counter() - start) / len(data) * 1000)
        rgb, bgr = statistics.median(times["rgb"]), statistics.median(times["bgr"])
        print(f"| {name} | {rgb:.2f} | {bgr:.2f} | {rgb / bgr:.2f}x |")


if __name__ == "__main__":
    main()
