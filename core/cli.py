"""The ``pretag`` command: a thin argparse layer over functions tests can call."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

log = logging.getLogger("pretag")

EXIT_USAGE = 2


FP16_HELP = "float16 network body; float32 I/O and post-processing (for GPUs)"


def _add_export(sub: argparse._SubParsersAction) -> None:
    export = sub.add_parser("export", help="write a contract ONNX model")
    models = export.add_subparsers(dest="model", required=True)
    frcnn = models.add_parser("fasterrcnn", help="torchvision Faster R-CNN ResNet-50 FPN")
    frcnn.add_argument("--weights", default="default",
                       help="default (torchvision COCO weights), random, or a .pth file")
    frcnn.add_argument("--output", required=True, type=Path)
    frcnn.add_argument("--classes", choices=["driving", "coco"], default="driving")
    frcnn.add_argument("--min-size", type=int, default=800)
    frcnn.add_argument("--max-size", type=int, default=1333)
    frcnn.add_argument("--score-threshold", type=float, default=0.05)
    frcnn.add_argument("--max-detections", type=int, default=100)
    frcnn.add_argument("--rpn-pre-nms-top-n", type=int, default=1000)
    frcnn.add_argument("--rpn-post-nms-top-n", type=int, default=1000)
    frcnn.add_argument("--fp16", action="store_true", help=FP16_HELP)
    frcnn.add_argument("--seed", type=int, default=0, help="seed for --weights random")
    yolox = models.add_parser("yolox", help="adapt a YOLOX ONNX export (e.g. yolox_nano.onnx)")
    yolox.add_argument("--onnx", required=True, type=Path)
    yolox.add_argument("--output", required=True, type=Path)
    yolox.add_argument("--classes", choices=["driving", "coco"], default="driving")
    yolox.add_argument("--input-size", type=int, default=416)
    yolox.add_argument("--score-threshold", type=float, default=0.05)
    yolox.add_argument("--nms-threshold", type=float, default=0.45)
    yolox.add_argument("--max-detections", type=int, default=100)
    yolox.add_argument("--fp16", action="store_true", help=FP16_HELP)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pretag", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_export(sub)
    from pretag.server import cli as serve_cli

    serve_cli.add_arguments(sub.add_parser("serve", help="run the gRPC inference server"))
    from pretag.client import cli as run_cli

    run_cli.add_arguments(sub.add_parser("run", help="pretag a folder of images"))
    from pretag.bench import cli as bench_cli

    bench_cli.add_arguments(sub.add_parser("bench", help="benchmarks (model, server, job)"))
    return parser


def run_export(args: argparse.Namespace) -> int:
    try:
        from pretag.export.common import ExportError
    except ImportError as exc:
        log.error("export needs the export extra (%s): pip install 'pretag[export]'", exc.name)
        return EXIT_USAGE
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


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    if args.command == "export":
        return run_export(args)
    if args.command == "serve":
        from pretag.server import cli as serve_cli

        return serve_cli.run(args)
    if args.command == "run":
        from pretag.client import cli as run_cli

        return run_cli.run(args)
    if args.command == "bench":
        from pretag.bench import cli as bench_cli

        args.argv = list(argv if argv is not None else sys.argv[1:])[1:]
        return bench_cli.run(args)
    return EXIT_USAGE  # pragma: no cover - argparse rejects unknown commands


if __name__ == "__main__":
    sys.exit(main())
