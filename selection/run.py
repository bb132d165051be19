"""``pretag select RUN_DIR --config FILE``: the selection over a finished ``pretag run``.

Samples are the run's images, or with ``worker_config.object_level`` its detections
(crops, named ``<image stem>-<index>-<ext>``). Outputs under ``DIR/selection/``:
``selected.txt`` (one name a line, in pick order) and ``selection.json`` (the config and,
per pick, its rank, name and each strategy's objective value).
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, replace
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from pretag.job.lock import hold
from pretag.job.outputs import write_atomic
from pretag.job.relevant import RelevantError, is_relevant, read_relevant
from pretag.job.vectors import embeddings_dir, vector_names, vector_shards
from pretag.job.video import frame_source
from pretag.selection.config import SelectionConfig, SelectionConfigError
from pretag.selection.custom import custom_vectors
from pretag.selection.datapool import earlier_picks, identity, write_pool
from pretag.selection.distributed import Loop, RayTarget, on_ray
from pretag.selection.export import (
    crop_source,
    export_coco,
    export_lightly,
    parents,
    write_crops,
)
from pretag.selection.greedy import Pick, greedy, passes
from pretag.selection.handoff import (
    LOCAL_FILES,
    export_cvat,
    export_label_studio,
    export_yolo,
)
from pretag.selection.objectives import objective_of, values_of
from pretag.selection.predictions import (
    RunPredictions,
    healthy,
    lightly_metadata,
    near_duplicates,
    read_run,
    staged,
)
from pretag.selection.report import Earlier, write_report
from pretag.selection.rows import Rows, ShardRows
from pretag.selection.samples import Samples
from pretag.selection.sequences import sequence_information, sequence_samples, window_count

log = logging.getLogger(__name__)


def image_samples(run_dir: Path, metadata: dict[str, dict[str, Any]],
                  run: RunPredictions | None = None, embeddings: Path | None = None,
                  vectors_here: bool = True) -> Samples:
    """The run's images (``run``: its predictions, when already read; ``embeddings``: a
    custom embeddings file whose vectors replace the run's; ``vectors_here`` False: the
    vectors are not loaded, Ray actors read them: :mod:`pretag.selection.distributed`)."""
    run = run or read_run(run_dir)
    index = {c: i for i, c in enumerate(run.classes)}
    names = list(run.entries)
    entries = [run.usable(n) for n in names]
    counts = np.zeros((len(entries), len(run.classes)))
    for row, entry in enumerate(entries):
        for label in entry["labels"]:
            counts[row, index[label]] += 1
    vectors: Rows | None = None
    if embeddings is not None:
        vectors = custom_vectors(embeddings, names)
    elif embeddings_dir(run_dir).is_dir() and vectors_here:
        paths, total = vector_shards(run_dir)
        if total:  # read when the strategies ask, not held (pretag.selection.rows)
            vectors = ShardRows.of_run(paths, names)
    return Samples(names, run.classes, counts, [np.array(e["scores"]) for e in entries],
                   vectors, metadata,
                   [np.array(e["probabilities"], float).reshape(-1, len(run.classes))
                    if "probabilities" in e else None for e in entries])


def crop_name(filename: str, index: int) -> str:
    path = PurePosixPath(filename)
    return str(path.with_name(f"{path.stem}-{index}-{path.suffix.lstrip('.')}"))


def object_samples(run_dir: Path, metadata: dict[str, dict[str, Any]],
                   run: RunPredictions | None = None) -> Samples:
    """Each stored object vector whose detection is usable in its image's prediction."""
    run = run or read_run(run_dir)
    names: list[str] = []
    labels: list[str] = []
    scores: list[np.ndarray] = []
    probabilities: list[np.ndarray | None] = []
    keep: list[int] = []
    row, bounds, dim = 0, [0], None
    paths, _ = vector_shards(run_dir, "objects")  # in shard-number order, as written
    for path in paths:
        _, dim = vector_names(path, dim)
        table = pq.read_table(path, columns=["filename", "detection", "label", "score"])
        for f, d, label, s in zip(*(table[c].to_pylist() for c in table.column_names),
                                  strict=True):
            entry = run.entries.get(f)
            if entry is not None and d < len(entry["boxes"]) and d not in run.bad.get(f, {}):
                names.append(crop_name(f, d))
                labels.append(label)
                scores.append(np.array([s]))
                rows = entry.get("probabilities")
                probabilities.append(None if rows is None
                                     else np.array([rows[d]], dtype=float))
                keep.append(row)
            row += 1
        bounds.append(row)
    if not row:
        raise SelectionConfigError("object level needs object vectors: pretag run "
                                   "--embeddings objects (or all)")
    vectors = ShardRows(paths, np.array(bounds), dim or 0, np.array(keep, np.int64))
    counts = np.zeros((len(names), len(run.classes)))
    counts[np.arange(len(names)), [run.classes.index(label) for label in labels]] = 1
    return Samples(names, run.classes, counts, scores, vectors, metadata, probabilities)


def select(config: SelectionConfig, samples: Samples, prior: np.ndarray | None = None,
           only: np.ndarray | None = None, loop: Loop | None = None) -> list[Pick]:
    """The picks; ``prior``: rows picked by earlier selections (a datapool's), which are
    not picked again and count as picked from the start; ``only``: a mask of the samples
    that may be picked (relevant_filenames_file); ``loop``: the greedy loop elsewhere
    (:func:`pretag.selection.distributed.on_ray`; no ``prior`` then)."""
    mask = np.ones(len(samples.names), dtype=bool) if only is None else only.copy()
    if prior is not None and len(prior):
        mask[prior] = False
    for step in config.steps:
        if step.strategy.type == "THRESHOLD":
            mask &= passes(values_of(step, samples), step.strategy)
    objectives = [objective_of(s, samples, loop is None) for s in config.steps
                  if s.strategy.type != "THRESHOLD"]
    for step, objective in zip((s for s in config.steps if s.strategy.type != "THRESHOLD"),
                               objectives, strict=True):
        if step.strategy.min_typicality is not None:  # samples below it are never picked
            mask &= objective.data >= step.strategy.min_typicality
    count = config.count(len(samples.names))
    if count > int(mask.sum()):
        log.warning("asked for %d samples, %d are available: selecting all of them", count,
                    int(mask.sum()))
    if loop is not None and any(o.kind == "diversity" for o in objectives):
        return loop(objectives, mask, count)
    return greedy(objectives, mask, count, prior=prior if prior is not None and len(prior)
                  else None)


def target_of(config: SelectionConfig) -> dict[str, float] | None:
    """The class target of the first BALANCE step over predictions, for the report."""
    for step in config.steps:
        if (step.strategy.type == "BALANCE" and step.input.type == "PREDICTIONS"
                and step.strategy.distribution == "TARGET" and step.strategy.target):
            return dict(step.strategy.target)
    return None


def run_selection(run_dir: Path, config: SelectionConfig, output_dir: Path | None = None,
                  metadata: dict[str, dict[str, Any]] | None = None,
                  images: Path | None = None, exports: tuple[str, ...] = (),
                  crops: bool = False, url_prefix: str = LOCAL_FILES,
                  ray: RayTarget | None = None) -> list[str]:
    """Select over ``run_dir`` and write the outputs and the report (see
    :mod:`pretag.selection.report`); returns the picked names in order. ``images``: the
    run's input folder, for debug images of the picks, the ``exports`` (coco, lightly)
    and the ``crops``. The folder is held (:mod:`pretag.job.lock`) and selection/ is
    replaced as one set (:func:`~pretag.selection.predictions.staged`). ``ray``: the
    greedy loop runs on a Ray cluster (:mod:`pretag.selection.distributed`)."""
    base = output_dir or run_dir
    if ray is not None:
        _ray_problem(config)
    if config.sequence_length > 1 and images is None:
        raise SelectionConfigError("worker_config.selected_sequence_length needs --images "
                                   "(the run's input folder): the frames' timestamps are "
                                   "read from the videos")
    with hold(base, "pretag select"):
        near = near_duplicates(run_dir) if config.remove_near_duplicates else None
        run, excluded = healthy(read_run(run_dir), config.corruption_threshold, near)
        metadata = _with_lightly(run, metadata or {})
        if config.object_level_task:
            samples = object_samples(run_dir, metadata or {}, run)
        else:
            custom = Path(config.embeddings) if config.embeddings else None
            samples = image_samples(run_dir, metadata or {}, run, custom, ray is None)
        if not samples.names:
            what = "usable detections" if config.object_level_task else "predicted images"
            raise SelectionConfigError(f"{run_dir} holds no {what} to select from")
        ident = identity(run_dir, samples, config)
        record, prior, missing = earlier_picks(base, config, ident, samples)
        if ray is None:
            picked = _pick(config, samples, prior)
        else:
            with on_ray(run_dir, samples.names, ray) as loop:
                picked = _pick(config, samples, prior, loop)
        names = [name for window in picked.windows for name in window]
        with staged(base) as out:
            _write_picks(out, config, picked, names, run)
            write_atomic(out / "excluded.json", json.dumps(excluded, indent=1) + "\n")
            if picked.sequences and images is not None:
                info = sequence_information(picked.windows, images)
                write_atomic(out / "sequence_information.json", json.dumps(info, indent=1))
            shown, shown_names = (parents(run, names) if config.object_level_task
                                  else (run, names))  # crops: their images, picked boxes only
            if "coco" in exports and images is not None:
                export_coco(shown, images, shown_names, out / "coco.json")
            if "lightly" in exports and images is not None:
                export_lightly(shown, images, shown_names, out / "lightly")
            if images is not None:
                _handoff(run_dir, shown, images, shown_names, out, exports, url_prefix)
            if crops and images is not None:
                count = write_crops(run, images, names, config.padding, out / "crops")
                log.info("wrote %d crops to %s", count, base / "selection" / "crops")
        write_report(run_dir, base, picked.samples, [p.index for p in picked.picks],
                     target_of(config), images,
                     Earlier(prior.tolist(), missing) if config.use_datapool else None,
                     excluded)
        if config.use_datapool and config.update_datapool:  # after selection/ is in place:
            write_pool(base, record, ident, config, names)  # a kill before keeps the old
    log.info("selected %d of %d samples into %s", len(names), len(samples.names),
             base / "selection")
    return names


def _with_lightly(run: RunPredictions, given: dict[str, dict[str, Any]]
                  ) -> dict[str, dict[str, Any]]:
    """The run's pixel metadata (``lightly.<key>``) beside the user's ``--metadata``, whose
    values win where both name a key."""
    merged = lightly_metadata(run)
    for name, values in given.items():
        merged[name] = {**merged.get(name, {}), **values}
    return merged


def _handoff(run_dir: Path, run: RunPredictions, images: Path, names: list[str], out: Path,
             exports: tuple[str, ...], url_prefix: str) -> None:
    """The labelling tools' formats asked for (selection/handoff.py)."""
    if "yolo" in exports:
        export_yolo(run, images, names, out / "yolo")
    if "cvat" in exports:
        export_cvat(run, images, names, out / "cvat")
    if "label-studio" in exports:
        export_label_studio(run, images, names, out / "label_studio", run_dir, url_prefix)


@dataclass(frozen=True)
class Picked:
    """What a selection picked: ``picks`` among ``samples`` (frames, crops or, with
    ``sequences``, windows of frames), and each pick's sample names (one, or a window's)."""

    samples: Samples
    picks: list[Pick]
    windows: list[list[str]]
    sequences: bool = False


def relevant_mask(config: SelectionConfig, samples: Samples) -> np.ndarray | None:
    """Which samples come from inputs named in the config's relevant_filenames_file (a
    crop from its image, a frame from its video or its own name)."""
    if config.relevant_filenames_file is None:
        return None
    try:
        entries = read_relevant(Path(config.relevant_filenames_file))
    except RelevantError as exc:
        raise SelectionConfigError(str(exc)) from None

    def relevant(name: str) -> bool:
        image = crop_source(name)[0] if config.object_level_task else name
        video = frame_source(image)
        return is_relevant(image, entries) or (video is not None
                                               and is_relevant(video[0], entries))

    mask = np.array([relevant(n) for n in samples.names], dtype=bool)
    if not mask.any():
        raise SelectionConfigError(f"no sample comes from an input named in "
                                   f"{config.relevant_filenames_file}")
    return mask


def _ray_problem(config: SelectionConfig) -> None:
    """What --ray does not distribute yet (SelectionConfigError)."""
    unsupported = [(config.object_level_task, "worker_config.object_level"),
                   (config.sequence_length > 1, "worker_config.selected_sequence_length"),
                   (config.use_datapool, "worker_config.use_datapool"),
                   (config.embeddings, "custom embeddings")]
    for present, what in unsupported:
        if present:
            raise SelectionConfigError(f"--ray: {what} is not distributed yet; run pretag "
                                       f"select without --ray")


def _pick(config: SelectionConfig, samples: Samples, prior: np.ndarray,
          loop: Loop | None = None) -> Picked:
    length = config.sequence_length
    if length == 1:
        picks = select(config, samples, prior, relevant_mask(config, samples), loop)
        return Picked(samples, picks, [[samples.names[p.index]] for p in picks])
    if config.use_datapool or config.relevant_filenames_file:
        raise SelectionConfigError("worker_config.use_datapool and relevant_filenames_file "
                                   "with selected_sequence_length are not supported yet")
    sequences, rows = sequence_samples(samples, length)
    frames = sum(len(w) for w in rows)
    count = window_count(frames, config.count(frames), length)
    picks = select(replace(config, n_samples=count, proportion_samples=None), sequences)
    return Picked(sequences, picks, [[samples.names[r] for r in rows[p.index]] for p in picks],
                  True)


def _write_picks(out: Path, config: SelectionConfig, picked: Picked, names: list[str],
                 run: RunPredictions) -> None:
    """selected.txt (one name a line: every frame of a picked window) and selection.json
    (config, picks, and the detections left out as unusable)."""
    write_atomic(out / "selected.txt", "".join(n + "\n" for n in names))
    steps = [s for s in config.steps if s.strategy.type != "THRESHOLD"]

    def pick(rank: int, window: list[str], p: Pick) -> dict[str, Any]:
        objectives = {f"{i}:{s.strategy.type}": v
                      for i, (s, v) in enumerate(zip(steps, p.objectives, strict=True))}
        return {"rank": rank, "name": window[0], "objectives": objectives,
                **({"frames": window} if picked.sequences else {})}

    record = {"config": asdict(config), "samples": len(picked.samples.names), "picks": [
        pick(r, w, p) for r, (w, p) in enumerate(zip(picked.windows, picked.picks,
                                                     strict=True))],
        "rejected_detections": run.rejected()}
    write_atomic(out / "selection.json", json.dumps(record, indent=1) + "\n")
