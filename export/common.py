"""Pieces shared by the exporters: errors, hashing, metadata, final checks."""

from __future__ import annotations

import hashlib
import logging
import tempfile
import warnings
from pathlib import Path
from typing import Any

from pretag.contract import ModelSpec, validate_model

log = logging.getLogger(__name__)

OPSET = 17  # RoiAlign-16 (output_half_pixel) and batched NonMaxSuppression

INPUT_NAMES = ["images", "image_sizes"]
DYNAMIC_AXES: dict[str, dict[int, str]] = {
    "images": {0: "N", 2: "H", 3: "W"},
    "image_sizes": {0: "N"},
    "boxes": {0: "N", 1: "K"},
    "scores": {0: "N", 1: "K"},
    "labels": {0: "N", 1: "K"},
    "num_detections": {0: "N"},
    "embeddings": {0: "N"},
    "object_embeddings": {0: "N", 1: "K"},
    "class_probabilities": {0: "N", 1: "K"},
}


def trace_to_onnx(module: Any, args: tuple[Any, ...], inputs: list[str], outputs: list[str],
                  axes: dict[str, dict[int, str]] | None = None) -> Any:
    """Trace a torch module with the legacy exporter into an onnx.ModelProto.

    The dynamo exporter fails on torchvision detection models, hence ``dynamo=False``.
    """
    import onnx
    import torch

    axes = axes or DYNAMIC_AXES
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings(), \
            torch.inference_mode():
        warnings.simplefilter("ignore")  # tracer warnings about shape arithmetic
        path = Path(tmp) / "graph.onnx"
        torch.onnx.export(module.eval(), args, str(path), dynamo=False, opset_version=OPSET,
                          input_names=inputs, output_names=outputs,
                          dynamic_axes={n: axes[n] for n in inputs + outputs if n in axes})
        return onnx.load(str(path))


class ExportError(RuntimeError):
    """An export cannot proceed; the message says what to do instead."""


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def finalize(model: Any, spec: ModelSpec, output: str | Path) -> ModelSpec:
    """Attach the contract metadata to an onnx.ModelProto, save it and validate it."""
    import onnx

    sizes = {"embeddings": spec.embedding_dim, "object_embeddings": spec.object_embedding_dim,
             "class_probabilities": len(spec.class_names)}
    for value_info in model.graph.output:  # the vector axis is fixed, as the contract says
        size = sizes.get(value_info.name)
        if size is not None:
            dim = value_info.type.tensor_type.shape.dim[-1]
            dim.Clear()
            dim.dim_value = size
    del model.metadata_props[:]
    for key, value in sorted(spec.metadata().items()):
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(model)
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(output.name + ".tmp")
    onnx.save(model, str(tmp))
    tmp.replace(output)
    checked = validate_model(output)
    log.info("wrote %s (%s, %s, %d classes, %.1f MB)", output, spec.name, spec.precision,
             len(spec.class_names), output.stat().st_size / 1e6)
    return checked
