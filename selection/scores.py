"""SCORES inputs: pretag's active-learning scores, one number per sample, from the run's
detections (``task: lightly_pretagging``).

* ``object_frequency``: the sample's objects over the largest count among the samples.
* ``objectness_least_confidence``: 1 minus the mean detection score (0 without objects).
* ``uncertainty_least_confidence``, ``uncertainty_margin``, ``uncertainty_entropy``: per
  object from its class probabilities p over the C classes, as Lightly's
  ``ScorerObjectDetection`` (its tests hold the formulas): (1 - max p) / (1 - 1/C);
  1 - (p1 - p2), the two largest; the entropy over log C. A sample's score is the
  largest over its objects; a sample without objects scores 0 (Lightly's rule). The
  probabilities come from ``pretag run`` with a model that gives them
  (``class_probabilities``); a run without them is an error saying so.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from pretag.selection.config import SelectionConfigError
from pretag.selection.samples import Samples

UNCERTAINTY = ("uncertainty_least_confidence", "uncertainty_margin", "uncertainty_entropy")


def least_confidence(p: np.ndarray) -> np.ndarray:
    classes = p.shape[1]
    if classes < 2:
        return np.zeros(len(p))
    return (1.0 - p.max(axis=1)) / (1.0 - 1.0 / classes)


def margin(p: np.ndarray) -> np.ndarray:
    if p.shape[1] < 2:
        return np.zeros(len(p))
    top = np.sort(p, axis=1)
    return 1.0 - (top[:, -1] - top[:, -2])


def entropy(p: np.ndarray) -> np.ndarray:
    if p.shape[1] < 2:
        return np.zeros(len(p))
    logs = np.log(np.where(p > 0, p, 1.0))
    return -(p * logs).sum(axis=1) / np.log(p.shape[1])


_PER_OBJECT: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "uncertainty_least_confidence": least_confidence, "uncertainty_margin": margin,
    "uncertainty_entropy": entropy}


def uncertainty(name: str, probabilities: Sequence[np.ndarray | None],
                objects: Sequence[int]) -> np.ndarray:
    """Each sample's ``name`` score: the largest over its objects' probability rows
    [n, C], 0 without objects. SelectionConfigError when samples with objects have none."""
    missing = [i for i, (p, n) in enumerate(zip(probabilities, objects, strict=True))
               if n and p is None]
    if missing:
        raise SelectionConfigError(
            f"SCORES {name}: {len(missing)} samples with detections have no class "
            f"probabilities (the run's predictions hold none: run pretag run with a model "
            f"exported by this pretag, which gives them, without --no-class-probabilities)")
    score = _PER_OBJECT[name]
    return np.array([float(score(np.asarray(p, float)).max()) if n and p is not None
                     and len(p) else 0.0 for p, n in zip(probabilities, objects, strict=True)])


def score_values(name: str, samples: Samples) -> np.ndarray:
    """The SCORES input ``name`` for every sample."""
    objects = samples.counts.sum(axis=1)
    if name == "object_frequency":
        return objects / max(objects.max(initial=0.0), 1.0)
    if name == "objectness_least_confidence":
        return np.array([1.0 - s.mean() if len(s) else 0.0 for s in samples.scores])
    probabilities = samples.probabilities or [None] * len(samples.names)
    return uncertainty(name, probabilities,
                       [len(s) if p is None else len(p)
                        for p, s in zip(probabilities, samples.scores, strict=True)])
