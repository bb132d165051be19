"""``pretag export {fasterrcnn,yolox}``: flags over the exporters (torch imported to run only)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

log = logging.getLogger("pretag")

FP16_HELP = "float16 network body; float32 I/O and post-processing (for GPUs)"


def _shared(parser: argparse.ArgumentParser) -> None:
    """Flags both exporters take."""
    parser.add_argument("--output", required=True, type=Path)
    parser.add_argument("--classes", choices=["driving", "coco"], default="driving")
    parser.add_argument("--score-threshold", type=float, default=0.05)
    parser.add_argument("--max-detections", type=int, default=100)
    parser.add_argument("--fp16", action="store_true", help=FP16_HELP)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    models = parser.add_subparsers(dest="model", required=True)
    frcnn = models.add_parser("fasterrcnn", help="torchvision Faster R-CNN ResNet-50 FPN")
    frcnn.add_argument("--weights", default="default",
                       help="default (torchvision COCO weights), random, or a .pth file")
    _shared(frcnn)
    frcnn.add_argument("--min-size", type=int, default=800)
    frcnn.add_argument("--max-size", type=int, default=1333)
    frcnn.add_argument("--rpn-pre-nms-top-n", type=int, default=1000)
    frcnn.add_argument("--rpn-post-nms-top-n", type=int, default=1000)
    frcnn.add_argument("--seed", type=int, default=0, help="seed for --weights random")
    yolox = models.add_parser("yolox", help="adapt a YOLOX ONNX export (e.g. yolox_nano.onnx)")
    yolox.add_argument("--onnx", required=True, type=Path)
    _shared(yolox)
    yolox.add_argument("--input-size", type=int, default=416)
    yolox.add_argument("--nms-threshold", type=float, default=0.45)


def run(args: argparse.Namespace) -> int:
    try:
        from pretag.export.common import ExportError
    except ImportError as exc:
        log.error("export needs the export extra (%s): pip install 'pretag[export]'", exc.name)
        return 2
    try:
        if args.model == "fasterrcnn":
            from pretag.export.fasterrcnn import FasterRCNNExport, export_fasterrcnn

            spec = export_fasterrcnn(FasterRCNNExport(
                output=args.output, weights=args.weights, classes=args.classes,
                min_size=args.min_size, max_size=args.max_size,
                score_threshold=args.score_threshold, max_detections=args.max_detections,
                rpn_pre_nms_top_n=args.rpn_pre_nms_top_n,
                rpn_post_nms_top_n=args.rpn_post_nms_top_n, fp16=args.fp16, seed=args.seed))
        else:
            from pretag.export.yolox import YoloxExport, export_yolox

            spec = export_yolox(YoloxExport(
                onnx=args.onnx, output=args.output, classes=args.classes,
                input_size=args.input_size, score_threshold=args.score_threshold,
                nms_threshold=args.nms_threshold, max_detections=args.max_detections,
                fp16=args.fp16))
    except ExportError as exc:
        log.error("%s", exc)
        return 1
    log.info("%s: classes %s", spec.name, ", ".join(spec.class_names))
    return 0
