"""The samples a selection runs over (images, or detections at object level)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from pretag.selection.rows import Rows


@dataclass
class Samples:
    """What the strategies read, one row per sample."""

    names: list[str]
    classes: list[str]
    counts: np.ndarray  # objects per class [N, C]
    scores: list[np.ndarray]  # detection scores per sample
    vectors: Rows | None  # [N, D]: an array, or a run's shards read when asked for
    metadata: dict[str, dict[str, Any]]
    #: each sample's class probabilities [n, C] per detection (None: not in the run)
    probabilities: list[np.ndarray | None] | None = None
