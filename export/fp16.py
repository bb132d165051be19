"""Float16 contract graphs (``--fp16``), for GPU execution providers.

Only the convolutional parts go to float16: the backbone and heads hold nearly
all of the FLOPs and tolerate it (it is what mixed-precision inference does).
Everything else stays float32: normalisation, anchor and box decoding, box
clipping, RoiAlign, NMS and the outputs, so the contract's inputs and outputs
and its post-processing are unchanged and box coordinates keep full precision.

* Faster R-CNN: :class:`HalfPrecision` wraps torchvision's modules before the
  trace, so the graph gets float16 weights with a ``Cast`` on either side.
  (ONNX Runtime's converter on the traced float32 graph, with the post-processing
  nodes blocked, wrote about 1,700 Casts and an invalid graph: one tensor name
  produced twice.)
* ONNX detectors such as YOLOX: :func:`onnx_to_fp16` converts the whole
  original graph (a plain CNN) with ONNX Runtime's converter, keeping its input
  and output float32; the float32 pre- and post-processing are spliced around it.

ONNX Runtime's CPU provider runs these graphs too (it casts around nodes that
have no float16 kernel), which is how the tests check them; it is not faster
there.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor, nn

from pretag.export.common import ExportError


def cast_floats(value: Any, dtype: torch.dtype) -> Any:
    """``value`` with every floating tensor in it (nested in dicts, lists, tuples) cast."""
    if isinstance(value, Tensor):
        return value.to(dtype) if value.is_floating_point() else value
    if isinstance(value, dict):
        return type(value)((k, cast_floats(v, dtype)) for k, v in value.items())
    if isinstance(value, list | tuple):
        return type(value)(cast_floats(v, dtype) for v in value)
    return value


class HalfPrecision(nn.Module):
    """A float16 copy of ``module``: float inputs cast to half, float outputs back to float32."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = copy.deepcopy(module).half()

    def forward(self, *args: Any) -> Any:
        return cast_floats(self.module(*cast_floats(args, torch.float16)), torch.float32)


def onnx_to_fp16(model: Any) -> Any:
    """A float16 copy of an onnx.ModelProto whose inputs and outputs stay float32."""
    try:
        from onnxruntime.transformers.float16 import convert_float_to_float16
        from onnxruntime.transformers.onnx_model import OnnxModel
    except ImportError as exc:  # an onnxruntime build without its transformers tools
        raise ExportError(f"--fp16 needs onnxruntime's float16 converter: {exc}") from None
    converted = convert_float_to_float16(copy.deepcopy(model), keep_io_types=True)
    # The converter appends its input Casts after the nodes that read them.
    OnnxModel(converted).topological_sort()
    return converted
