"""INT8 on the CPU, as an experiment (issue 26): does ONNX Runtime static quantization make
the contract models faster here, and at what cost in accuracy?

For YOLOX-Nano (contract model, seven driving classes, letterbox 416) each variant is
quantized with ``onnxruntime.quantization.quantize_static`` (MinMax calibration on the 11
driving frames and the first 32 coco128 images), then measured against float32 in the same
run: model-only images/s (one session, every core, batch 4 over coco128 decoded and resized
beforehand, alternated passes, median), AP@[.5:.95] on coco128 (the seven classes, every
detection down to the in-graph 0.05) and, with ONNX Runtime's profiler, the time per
operator type (which kernels actually run). The detection head (the last 36 convolutions:
per level a stem, 2+2 depthwise-separable convs and the cls/reg/obj predictions) and the
in-graph post-processing (decode, NMS, padding) stay float in every variant.

Variants: QDQ and QOperator formats; U8S8 (activations uint8, weights int8) and S8S8;
per-channel weights; "conv" quantizes Conv only, "chain" also SiLU's Sigmoid and Mul, Add,
Concat, MaxPool and Resize so that a run of quantized ops stays int8 between them;
"percentile" calibrates activations to their 99.999th percentile instead of min/max.

    python benchmarks/int8_experiment.py ../shared [--faster-rcnn]

``--faster-rcnn`` also times torchvision's Faster R-CNN (random weights: none can be
downloaded here, so only speed and agreement with its own float32 graph are measured) with
its ResNet-50 + FPN convolutions quantized. Prints one JSON line per variant.
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_static,
)

from pretag.contract import DRIVING_CLASSES, ModelSpec, validate_model
from pretag.evaluate import coco_ap
from pretag.export.yolox import YoloxExport, export_yolox
from pretag.preprocess import preprocess

sys.path.insert(0, str(Path(__file__).parent))
from yolox_sizes import predict

log = logging.getLogger("int8")
HEAD_CONVS = 36  # 3 levels x (stem + 2 x 2 depthwise-separable + cls, reg, obj)
FRCNN_CHAIN = ["Conv", "Relu", "Add", "MaxPool"]
CHAIN_OPS = ["Conv", "Sigmoid", "Mul", "Add", "Concat", "MaxPool", "Resize"]


class Reader(CalibrationDataReader):
    """Feeds the contract model's two inputs, one image at a time."""

    def __init__(self, paths: list[Path], spec: ModelSpec) -> None:
        self.batches: Iterator[dict[str, np.ndarray]] = iter(
            {"images": b.images, "image_sizes": b.image_sizes}
            for b in (preprocess([p.read_bytes()], spec.resize)[0] for p in paths))

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self.batches, None)


def float_nodes(model: onnx.ModelProto, head_convs: int) -> list[str]:
    """Nodes that stay float: the last ``head_convs`` Conv nodes and everything after the
    first of them that is not a Conv of the backbone (the head's activations, the decode and
    the post-processing)."""
    nodes = list(model.graph.node)
    convs = [i for i, n in enumerate(nodes) if n.op_type == "Conv"]
    first_head = convs[-head_convs] if head_convs else len(nodes)
    return [n.name for n in nodes[first_head:]]


def quantize(src: Path, dst: Path, calib: list[Path], spec: ModelSpec, fmt: QuantFormat,
             act: QuantType, ops: list[str], head_convs: int,
             method: CalibrationMethod = CalibrationMethod.MinMax) -> None:
    model = onnx.load(str(src))
    quantize_static(str(src), str(dst), Reader(calib, spec), quant_format=fmt,
                    activation_type=act, weight_type=QuantType.QInt8, per_channel=True,
                    op_types_to_quantize=ops, nodes_to_exclude=float_nodes(model, head_convs),
                    calibrate_method=method,
                    extra_options={"ActivationSymmetric": act == QuantType.QInt8})


def session(path: Path, profile: str | None = None) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    if profile:
        opts.enable_profiling = True
        opts.profile_file_prefix = profile
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def batches(paths: list[Path], spec: ModelSpec, size: int = 4) -> list[dict[str, np.ndarray]]:
    out = []
    for s in range(0, len(paths), size):
        b = preprocess([p.read_bytes() for p in paths[s:s + size]], spec.resize)[0]
        out.append({"images": b.images, "image_sizes": b.image_sizes})
    return out


def one_pass(sess: ort.InferenceSession, feeds: list[dict[str, np.ndarray]]) -> float:
    images = sum(len(f["images"]) for f in feeds)
    start = time.perf_counter()
    for f in feeds:
        sess.run(None, f)
    return images / (time.perf_counter() - start)


def op_profile(path: Path, feeds: list[dict[str, np.ndarray]], tmp: Path) -> dict[str, float]:
    """Share of kernel time per operator type over one pass (ONNX Runtime's profiler)."""
    sess = session(path, str(tmp / path.stem))
    for f in feeds[:8]:
        sess.run(None, f)
    trace = json.loads(Path(sess.end_profiling()).read_text())
    per_op: collections.Counter[str] = collections.Counter()
    for event in trace:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            per_op[event["args"]["op_name"]] += event["dur"]
    total = sum(per_op.values()) or 1
    return {op: round(us / total, 3) for op, us in per_op.most_common(8)}


def compare(paths: dict[str, Path], feeds: list[dict[str, np.ndarray]],
            rounds: int = 3) -> dict[str, float]:
    """Model-only images/s of every model, passes alternated, median."""
    sessions = {name: session(p) for name, p in paths.items()}
    for s in sessions.values():
        one_pass(s, feeds[:2])
    rates: dict[str, list[float]] = {name: [] for name in sessions}
    for _ in range(rounds):
        for name, s in sessions.items():
            rates[name].append(one_pass(s, feeds))
    return {name: statistics.median(r) for name, r in rates.items()}


def yolox(shared: Path, tmp: Path) -> None:
    coco = sorted((shared / "data" / "coco128" / "images").rglob("*.jpg"))
    driving = sorted((shared / "data" / "driving").iterdir())
    ann = shared / "data" / "coco128" / "annotations" / "instances_train2017.json"
    fp32 = tmp / "yolox_fp32.onnx"
    export_yolox(YoloxExport(onnx=shared / "models" / "yolox_nano.onnx", output=fp32))
    spec = validate_model(fp32)
    calib = driving + coco[:32]
    models = {"fp32": fp32}
    for fmt in (QuantFormat.QDQ, QuantFormat.QOperator):
        for act in (QuantType.QUInt8, QuantType.QInt8):
            for ops_name, ops in (("conv", ["Conv"]), ("chain", CHAIN_OPS)):
                name = f"{fmt.name}-{'U8S8' if act == QuantType.QUInt8 else 'S8S8'}-{ops_name}"
                out = tmp / f"yolox_{name}.onnx"
                try:
                    quantize(fp32, out, calib, spec, fmt, act, ops, HEAD_CONVS)
                    validate_model(out)
                    models[name] = out
                except Exception as exc:  # an experiment: report the variant that fails
                    print(json.dumps({"model": "yolox", "variant": name,
                                      "error": f"{type(exc).__name__}: {exc}"[:300]}),
                          flush=True)
    for fmt in (QuantFormat.QDQ, QuantFormat.QOperator):  # the calibration that did best
        name = f"{fmt.name}-U8S8-chain-percentile"
        out = tmp / f"yolox_{name}.onnx"
        quantize(fp32, out, calib, spec, fmt, QuantType.QUInt8, CHAIN_OPS, HEAD_CONVS,
                 CalibrationMethod.Percentile)
        models[name] = out
    feeds = batches(coco, spec)
    rates = compare(models, feeds)
    for name, path in models.items():
        ap = coco_ap(predict(session(path), spec, coco), ann, DRIVING_CLASSES)
        print(json.dumps({"model": "yolox_nano_416", "variant": name,
                          "images_per_s": round(rates[name], 1),
                          "over_fp32": round(rates[name] / rates["fp32"], 3),
                          "ap": round(ap, 4), "mb": round(path.stat().st_size / 2**20, 2),
                          "op_time_share": op_profile(path, feeds, tmp)}), flush=True)


def vectors(path: Path, feeds: list[dict[str, np.ndarray]]) -> np.ndarray:
    """Unit image vectors (the contract's ``embeddings``): with random weights the boxes
    mean nothing, but the backbone's pooled features show what quantization does to it."""
    sess = session(path)
    out = np.concatenate([sess.run(["embeddings"], f)[0] for f in feeds])
    return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)


def faster_rcnn(shared: Path, tmp: Path) -> None:
    from pretag.export.fasterrcnn import FasterRCNNExport, export_fasterrcnn

    fp32 = tmp / "frcnn_fp32.onnx"
    export_fasterrcnn(FasterRCNNExport(output=fp32, weights="random", min_size=512, max_size=512))
    spec = validate_model(fp32)
    coco = sorted((shared / "data" / "coco128" / "images").rglob("*.jpg"))[:16]
    calib = sorted((shared / "data" / "driving").iterdir())[:8]
    models = {"fp32": fp32}
    # The exported graph computes the convolutions' biases (folded FrozenBatchNorm) with
    # nodes, and the quantizer skips a Conv whose bias is not an initializer; ONNX
    # Runtime's optimizer folds them into constants first ("pre").
    folded = tmp / "frcnn_folded.onnx"
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    opts.optimized_model_filepath = str(folded)
    ort.InferenceSession(str(fp32), opts, providers=["CPUExecutionProvider"])
    for src, pre in ((fp32, ""), (folded, "pre-")):
        model = onnx.load(str(src))
        for fmt in (QuantFormat.QDQ, QuantFormat.QOperator):
            for ops_name, ops in (("conv", ["Conv"]), ("chain", FRCNN_CHAIN)):
                name = f"{pre}{fmt.name}-U8S8-{ops_name}"
                out = tmp / f"frcnn_{name}.onnx"
                backbone = [n.name for n in model.graph.node if n.op_type in ops
                            and ("backbone" in n.name or "fpn" in n.name)]
                try:
                    quantize_static(str(src), str(out), Reader(calib, spec), quant_format=fmt,
                                    activation_type=QuantType.QUInt8,
                                    weight_type=QuantType.QInt8, per_channel=True,
                                    op_types_to_quantize=ops, nodes_to_quantize=backbone)
                    models[name] = out
                except Exception as exc:
                    print(json.dumps({"model": "faster_rcnn", "variant": name,
                                      "error": f"{type(exc).__name__}: {exc}"[:300]}),
                          flush=True)
    feeds = batches(coco, spec, size=1)
    rates = compare(models, feeds, rounds=2)
    reference = vectors(models["fp32"], feeds)
    for name, path in models.items():
        cosine = np.sum(vectors(path, feeds) * reference, axis=1)
        print(json.dumps({"model": "faster_rcnn_512_random_weights", "variant": name,
                          "images_per_s": round(rates[name], 2),
                          "embedding_cosine_min": round(float(cosine.min()), 4),
                          "over_fp32": round(rates[name] / rates["fp32"], 3),
                          "op_time_share": op_profile(path, feeds, tmp)}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("shared", type=Path, nargs="?", default=Path("../shared"))
    parser.add_argument("--faster-rcnn", action="store_true")
    parser.add_argument("--only-faster-rcnn", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    info: dict[str, Any] = {"onnxruntime": ort.__version__}
    print(json.dumps(info), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        if not args.only_faster_rcnn:
            yolox(args.shared, Path(tmp))
        if args.faster_rcnn or args.only_faster_rcnn:
            faster_rcnn(args.shared, Path(tmp))


if __name__ == "__main__":
    main()
