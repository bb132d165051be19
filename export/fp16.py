"""FP16 conversion of a contract graph (for GPU execution providers).

Convolutions and matrix products run in half precision; box arithmetic,
NMS, RoiAlign, TopK and the softmax stay in float32 so that coordinates and
scores keep their precision. Inputs and outputs keep the contract's types.
"""

from __future__ import annotations

from typing import Any

from pretag.export.common import ExportError

FP32_OPS = [
    "NonMaxSuppression", "RoiAlign", "TopK", "Softmax", "Exp", "Log", "Sqrt", "Div",
    "ScatterElements", "ScatterND", "Gather", "GatherElements", "Where", "Range",
    "Clip", "Min", "Max", "ReduceSum", "ReduceMean", "Cast", "Floor",
]


def to_fp16(model: Any) -> Any:
    """Return ``model`` (onnx.ModelProto) with float32 weights and math in float16."""
    try:
        from onnxconverter_common import float16
    except ImportError:
        raise ExportError("--fp16 needs onnxconverter-common: pip install 'pretag[export]'"
                          ) from None
    return float16.convert_float_to_float16(model, keep_io_types=True,
                                            op_block_list=FP32_OPS, disable_shape_infer=False)
