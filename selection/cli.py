"""``pretag select RUN_DIR --config FILE``: flags over :func:`run_selection`."""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

from pretag.job.stream import RunError
from pretag.selection.config import SelectionConfigError, load
from pretag.selection.distributed import RayTarget
from pretag.selection.export import FORMATS
from pretag.selection.handoff import LOCAL_FILES
from pretag.selection.run import run_selection

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
             "(selection/coco.json), lightly (selection/lightly/.lightly/predictions), yolo "
             "(selection/yolo/: Ultralytics' layout), cvat (selection/cvat/annotations.xml, "
             "CVAT for images 1.1) or label-studio (selection/label_studio/tasks.json and "
             "labeling_config.xml); repeatable")
    add("--url-prefix", default=LOCAL_FILES,
        help=f"label-studio: each task's image URL is this plus the image's name (default "
             f"{LOCAL_FILES}, Label Studio's local files with --images as its document root)")
    add("--embeddings", type=Path, metavar="FILE",
        help="your own vectors instead of the run's: Lightly's embeddings.csv (filenames, "
             "embedding_0..D-1, labels) or Parquet (as worker_config.embeddings)")
    add("--remove-near-duplicates", action="store_true",
        help="leave out all but the first image of each group in the run's "
             "report/near_duplicates.json (pretag run --near-duplicate-distance)")
    add("--ray", nargs="?", const="local", metavar="ADDRESS",
        help="run the greedy loop on a Ray cluster, the image vectors sharded over actors "
             "that read their own Parquet shards (ADDRESS: the head's HOST:PORT, or none "
             "for a local cluster); the picks are those of one machine")
    add("--ray-actors", type=int, default=2, help="actors holding the vectors (default 2)")
    add("--ray-cpus-per-actor", type=float, default=1.0,
        help="Ray CPUs each actor holds (default 1)")
    add("--write-crops", action="store_true",
        help="object level: write each picked crop (with the config's padding) as a PNG "
             "under selection/crops/; needs --images")


def _metadata(path: Path | None) -> dict[str, dict[str, Any]]:
    if path is None:
        return {}
    try:
        data = json.loads(path.read_text())
    except ValueError as exc:
        raise SelectionConfigError(f"--metadata {path} is not JSON ({exc})") from None
    if not (isinstance(data, dict) and all(isinstance(v, dict) for v in data.values())):
        raise SelectionConfigError(f"--metadata {path} must be a JSON object "
                                   f"{{filename: {{key: value, ...}}, ...}}")
    return data


def run(args: argparse.Namespace) -> int:
    try:
        if args.n_samples is not None and args.n_samples < 0:
            raise SelectionConfigError("--n-samples must be at least 0")
        config = load(args.config, args.n_samples)
        if args.embeddings is not None:
            config = replace(config, embeddings=str(args.embeddings))
            if config.object_level_task:
                raise SelectionConfigError("--embeddings are one vector per image; they "
                                           "cannot go with object_level")
        if args.remove_near_duplicates:
            config = replace(config, remove_near_duplicates=True)
        metadata = _metadata(args.metadata)
        if not (args.run_dir / ".lightly" / "predictions").is_dir():
            raise SelectionConfigError(f"{args.run_dir} holds no predictions (pretag run "
                                       f"writes them)")
        if args.export and args.images is None:
            raise SelectionConfigError("--export needs --images (the run's input folder, for "
                                       "pixel sizes)")
        if args.write_crops and (args.images is None or not config.object_level_task):
            raise SelectionConfigError("--write-crops needs --images and object-level "
                                       "selection (worker_config.object_level)")
        ray = None if args.ray is None else RayTarget(
            None if args.ray == "local" else args.ray, args.ray_actors, args.ray_cpus_per_actor)
        run_selection(args.run_dir, config, args.output_dir, metadata, args.images,
                      tuple(args.export), args.write_crops, args.url_prefix, ray)
    except (SelectionConfigError, RunError, OSError, ValueError) as exc:
        log.error("%s", exc)
        return 2
    return 0
