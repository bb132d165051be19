"""Sequence selection (``worker_config.selected_sequence_length = X``): windows of X
consecutive frames of one video are the samples, as in the Lightly Worker.

A window is X frames of one video in frame-number order among the run's frames (so with
``--frame-stride`` consecutive kept frames), windows do not overlap and a shorter tail is
left out. Its objects are its frames' objects, its scores theirs, its vector the mean of
its frames' vectors (Lightly averages frame embeddings). Inputs that are not video frames
take no part. ``selection/sequence_information.json`` lists each picked window:
video_name, frame_names, frame_timestamps_pts, frame_indices.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from pretag.job.video import VideoError, frame_source, probe
from pretag.selection.config import SelectionConfigError
from pretag.selection.samples import Samples


def sequence_samples(frames: Samples, length: int) -> tuple[Samples, list[list[int]]]:
    """The windows of ``length`` frames as samples (named by their first frame), and each
    window's rows in ``frames``."""
    by_video: dict[str, list[tuple[int, int]]] = defaultdict(list)
    for row, name in enumerate(frames.names):
        source = frame_source(name)
        if source is not None:
            by_video[source[0]].append((source[1], row))
    windows: list[list[int]] = []
    for video in sorted(by_video):
        rows = [row for _, row in sorted(by_video[video])]
        windows += [rows[i:i + length] for i in range(0, len(rows) - length + 1, length)]
    if not windows:
        raise SelectionConfigError(f"worker_config.selected_sequence_length {length}: no "
                                   f"video has {length} predicted frames in this run")
    every = None if frames.vectors is None else np.asarray(frames.vectors)  # one read
    vectors = None if every is None else np.stack([every[w].mean(axis=0) for w in windows])
    per_frame = frames.probabilities
    probabilities = None if per_frame is None else [
        None if any(per_frame[i] is None and len(frames.scores[i]) for i in w) else
        np.concatenate([np.zeros((0, len(frames.classes))) if per_frame[i] is None
                        else per_frame[i] for i in w]) for w in windows]  # its frames' objects
    return Samples([frames.names[w[0]] for w in windows], frames.classes,
                   np.stack([frames.counts[w].sum(axis=0) for w in windows]),
                   [np.concatenate([frames.scores[i] for i in w]) for w in windows],
                   vectors, frames.metadata, probabilities), windows


def window_count(frames: int, wanted: int, length: int) -> int:
    """Windows to pick for ``wanted`` frames; n_samples must be a multiple of the length."""
    if wanted % length:
        raise SelectionConfigError(
            f"selection_config.n_samples: {wanted} frames is not a multiple of "
            f"worker_config.selected_sequence_length {length} (of {frames} frames); pick "
            f"{wanted // length * length} or {(wanted // length + 1) * length}")
    return wanted // length


def sequence_information(names: list[list[str]], images: Path) -> list[dict[str, Any]]:
    """One record per picked window (its frames' names), with the frames' presentation
    timestamps read from the video in ``images`` (the run's input folder)."""
    probed: dict[str, Any] = {}
    out = []
    for window in names:
        sources = [frame_source(name) for name in window]
        video_name = sources[0][0] if sources[0] else ""
        if video_name not in probed:
            try:
                probed[video_name] = probe(images / video_name, video_name, 10**9)
            except VideoError as exc:
                raise SelectionConfigError(f"cannot read {images / video_name} for the "
                                           f"frames' timestamps: {exc}") from None
        video = probed[video_name]
        indices = [source[1] for source in sources if source is not None]
        out.append({"video_name": video_name, "frame_names": window,
                    "frame_timestamps_pts": [video.pts[k] for k in indices],
                    "frame_indices": indices})
    return out
