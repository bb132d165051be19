"""FP16 conversion of a contract graph (for GPU execution providers): not available yet.

Tried: onnxconverter-common's ``convert_float_to_float16`` (keep_io_types, with NMS,
RoiAlign, TopK and box arithmetic kept in float32). With shape inference it did not
finish within 5 minutes on YOLOX-Nano; without it, it wrote graphs that ONNX Runtime
rejects (``Where`` bound to float and float16). Until a conversion is shown to load
and to match the float32 graph, ``--fp16`` stops with this explanation rather than
hang or write a broken model.
"""

from __future__ import annotations

from typing import NoReturn

from pretag.export.common import ExportError


def to_fp16() -> NoReturn:
    """Refuse ``--fp16``, with the reason (see the module docstring)."""
    raise ExportError(
        "--fp16 is not available yet: the float16 conversion of the contract graph is not "
        "verified (onnxconverter-common hangs or writes mistyped Where nodes on it). Export "
        "float32; ONNX Runtime's CUDA provider runs it.")
