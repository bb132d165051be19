"""``pretag select RUN_DIR --config FILE``: flags over :func:`run_selection`."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from pretag.selection.config import SelectionConfigError, load
from pretag.selection.export import FORMATS, export_coco, export_lightly, write_crops
from pretag.selection.run import run_classes, run_selection

log = logging.getLogger("pretag")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("run_dir", type=Path, help="the --output-dir of a finished pretag run")
    add("--config", type=Path, required=True,
        help="JSON or YAML: a Lightly selection_config, or {\"worker_config\": ..., "
             "\"selection_config\": ...}")
    add("--output-dir", type=Path, help="where selection/ goes (default: RUN_DIR)")
    add("--n-samples", type=int, help="overrides the config's n_samples / proportion_samples")
    add("--metadata", type=Path,
        help="JSON {filename: {key: value}} for METADATA inputs")
    add("--images", type=Path, help="the run's input folder: draws the picked images with "
                                    "their boxes in the report; needed by --export")
    add("--export", action="append", choices=FORMATS, default=[],
        help="also write the picks with pretag's boxes for labelling: coco "
             "(selection/coco.json) or lightly (selection/lightly/.lightly/predictions); "
             "repeatable")
    add("--write-crops", action="store_true",
        help="object level: write each picked crop (with the config's padding) as a PNG "
             "under selection/crops/; needs --images")


def run(args: argparse.Namespace) -> int:
    try:
        if args.n_samples is not None and args.n_samples < 0:
            raise SelectionConfigError("--n-samples must be at least 0")
        config = load(args.config, args.n_samples)
        metadata = json.loads(args.metadata.read_text()) if args.metadata else {}
        if not (args.run_dir / ".lightly" / "predictions").is_dir():
            raise SelectionConfigError(f"{args.run_dir} holds no predictions (pretag run "
                                       f"writes them)")
        if args.export and (args.images is None or config.object_level_task):
            raise SelectionConfigError("--export needs --images (the run's input folder, for "
                                       "pixel sizes) and image-level selection")
        if args.write_crops and (args.images is None or not config.object_level_task):
            raise SelectionConfigError("--write-crops needs --images and object-level "
                                       "selection (worker_config.object_level)")
        names = run_selection(args.run_dir, config, args.output_dir, metadata, args.images)
        out = (args.output_dir or args.run_dir) / "selection"
        classes = run_classes(args.run_dir)
        if "coco" in args.export:
            export_coco(args.run_dir, args.images, names, classes, out / "coco.json")
        if "lightly" in args.export:
            export_lightly(args.run_dir, args.images, names, classes, out / "lightly")
        if args.write_crops:
            count = write_crops(args.run_dir, args.images, names, config.padding, out / "crops")
            log.info("wrote %d crops to %s", count, out / "crops")
    except (SelectionConfigError, OSError, ValueError) as exc:
        log.error("%s", exc)
        return 2
    return 0
