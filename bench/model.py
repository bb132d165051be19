"""Model-only benchmark: ONNX Runtime in-process at several batch sizes, and for Faster
R-CNN torchvision eager on the same preprocessed tensors, the two alternated in one run.

A timed call is one whole model call as a server makes it: host arrays in, host
arrays out (so on a GPU it includes the copies). With ``gflops_per_image`` and
``peak_tflops`` each row also says what fraction of the device's peak it reached.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pretag.bench.stats import best_rows, percentiles
from pretag.job.sources import list_images
from pretag.preprocess import Batch, decode_image, pad_batch, resize_image
from pretag.runtime.backend import BackendConfig, OrtBackend

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelBench:
    model: Path
    images: Path
    batch_sizes: tuple[int, ...] = (1, 2, 4, 8)
    iterations: int = 3  # timed runs per batch size and engine
    torch_weights: str | None = None  # with a Faster R-CNN model: also torchvision eager
    threads: int | None = None
    seed: int = 0
    providers: tuple[str, ...] = ("cpu",)  # ONNX Runtime's, e.g. ("cuda",)
    torch_device: str = "cpu"
    gflops_per_image: float | None = None  # e.g. 134 for Faster R-CNN R50-FPN at 800x1333
    peak_tflops: float | None = None  # the device's peak for the precision measured


def load_resized(folder: Path, backend: OrtBackend) -> list[np.ndarray]:
    """The resized images of the most common size in ``folder``.

    Batches are then built from images of one size, so that padding (which the
    server avoids by grouping images by shape) does not blur the batch scaling.
    """
    items = list_images(folder).items
    if not items:
        raise ValueError(f"no images in {folder}")
    resized = [resize_image(decode_image(i.path.read_bytes()), backend.spec.resize)
               for i in items]
    shapes = Counter(img.shape for img in resized)
    common = shapes.most_common(1)[0][0]
    return [img for img in resized if img.shape == common]


def make_batch(images: list[np.ndarray], size: int, backend: OrtBackend) -> Batch:
    return pad_batch([images[i % len(images)] for i in range(size)], backend.spec.resize)


def _torch_runner(cfg: ModelBench, backend: OrtBackend) -> Callable[[Batch], Any]:
    """torchvision's eager Faster R-CNN (inference_mode) on the same uint8 batch."""
    import torch

    from pretag.export.fasterrcnn import class_selection, eager_reference
    from pretag.export.weights import load_fasterrcnn

    spec = backend.spec
    if not spec.name.startswith("fasterrcnn"):
        raise ValueError(f"--torch-weights needs a Faster R-CNN model, not {spec.name}")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    loaded = load_fasterrcnn(cfg.torch_weights or "random", seed=cfg.seed,
                             min_size=spec.resize.min_size, max_size=spec.resize.max_size)
    model = loaded.model.to(cfg.torch_device)
    class_ids, _ = class_selection("coco" if len(spec.class_names) > 7 else "driving")

    def run(batch: Batch) -> Any:
        images = torch.from_numpy(batch.images).to(cfg.torch_device)
        sizes = torch.from_numpy(batch.image_sizes)
        return eager_reference(model, images, sizes, class_ids, spec.max_detections,
                               spec.score_threshold)  # ends in host values: synchronised

    return run


def _row(engine: str, batch: Batch, times: list[float], cfg: ModelBench) -> dict[str, Any]:
    size = batch.images.shape[0]
    row: dict[str, Any] = {
        "engine": engine, "batch_size": size,
        "canvas": f"{batch.images.shape[2]}x{batch.images.shape[3]}",
        "ms_per_batch": 1000 * float(np.median(times)),
        "p99_ms": percentiles(times)["p99_ms"],
        "images_per_s": size * len(times) / sum(times)}
    if cfg.gflops_per_image:
        row["tflops"] = row["images_per_s"] * cfg.gflops_per_image / 1000
        if cfg.peak_tflops:
            row["fraction_of_peak"] = row["tflops"] / cfg.peak_tflops
    return row


def bench_model(cfg: ModelBench) -> dict[str, Any]:
    backend = OrtBackend(cfg.model, BackendConfig(providers=cfg.providers, threads=cfg.threads))
    images = load_resized(cfg.images, backend)
    engines: dict[str, Callable[[Batch], Any]] = {"onnxruntime": backend.run}
    if cfg.torch_weights is not None:
        engines["torch_eager"] = _torch_runner(cfg, backend)
    rows: list[dict[str, Any]] = []
    for size in cfg.batch_sizes:
        batch = make_batch(images, size, backend)
        times: dict[str, list[float]] = {name: [] for name in engines}
        for run in engines.values():  # warm-up, not timed
            run(batch)
        for _ in range(cfg.iterations):  # alternate so both see the same machine state
            for name, run in engines.items():
                start = time.perf_counter()
                run(batch)
                times[name].append(time.perf_counter() - start)
        for name, t in times.items():
            rows.append(_row(name, batch, t, cfg))
            log.info("%s batch %d: %.2f images/s", name, size, rows[-1]["images_per_s"])
    best = best_rows(rows, "engine")
    result: dict[str, Any] = {"model": backend.spec.name, "precision": backend.spec.precision,
                              "providers": list(backend.providers),
                              "torch_device": cfg.torch_device if "torch_eager" in engines
                              else None, "rows": rows, "best": best}
    if "torch_eager" in best:
        result["ort_over_torch"] = (best["onnxruntime"]["images_per_s"]
                                    / best["torch_eager"]["images_per_s"])
    return result
