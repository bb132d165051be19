"""Each strategy's input as the greedy loop's :class:`~pretag.selection.greedy.Objective`:
BALANCE's counts and target, the values of WEIGHTS and THRESHOLD inputs (predictions,
scores, metadata, random), DIVERSITY's unit vectors, TYPICALITY's and SIMILARITY's values
from them."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pretag.selection.config import SelectionConfigError, Step
from pretag.selection.cover import mean_neighbour_distance, nearest_distances
from pretag.selection.custom import load_custom
from pretag.selection.greedy import Objective
from pretag.selection.rows import TINY, Rows, normalise, take, unit
from pretag.selection.samples import Samples
from pretag.selection.scores import score_values


def _balance_target(step: Step, samples: Samples) -> tuple[np.ndarray, np.ndarray]:
    """(counts per bucket [N, B], target over the buckets). Classes a TARGET leaves out
    share one bucket holding what the listed shares leave."""
    strategy, counts = step.strategy, samples.counts
    if step.input.type == "METADATA":
        values = [str(samples.metadata.get(n, {}).get(step.input.key or "")) for n in
                  samples.names]
        classes = sorted(set(values))
        counts = np.array([[v == c for c in classes] for v in values], dtype=float)
    else:
        classes = samples.classes
    if strategy.distribution == "UNIFORM":
        present = counts.sum(axis=0) > 0
        return counts, present / max(present.sum(), 1)
    if strategy.distribution == "INPUT":
        total = counts.sum()
        return counts, counts.sum(axis=0) / total if total else np.zeros(counts.shape[1])
    target = dict(strategy.target or ())
    unknown = sorted(set(target) - set(classes))
    if unknown:
        raise SelectionConfigError(f"balance target names {unknown[0]!r}, which is not one "
                                   f"of {', '.join(classes)}")
    listed = [classes.index(c) for c in target]
    rest = [i for i in range(len(classes)) if i not in listed]
    grouped = np.concatenate([counts[:, listed], counts[:, rest].sum(axis=1, keepdims=True)],
                             axis=1)
    shares = np.array([*target.values(), max(0.0, 1.0 - sum(target.values()))])
    return grouped, shares


def values_of(step: Step, samples: Samples) -> np.ndarray:
    """A step's input as one number per sample (WEIGHTS and THRESHOLD)."""
    kind = step.input.type
    if kind == "RANDOM":
        return np.random.default_rng(step.input.random_seed).random(len(samples.names))
    if kind == "PREDICTIONS":
        wanted = step.input.categories or tuple(samples.classes)
        return samples.counts[:, [samples.classes.index(c) for c in wanted]].sum(axis=1)
    if kind == "SCORES":
        return score_values(str(step.input.score), samples)
    key = step.input.key or ""
    try:
        values = np.array([float(samples.metadata[n][key]) for n in samples.names])
    except (KeyError, TypeError, ValueError) as exc:
        raise SelectionConfigError(f"metadata key {key!r} is missing or not a number for "
                                   f"some sample ({exc})") from None
    bad = [(n, v) for n, v in zip(samples.names, values, strict=True) if not np.isfinite(v)]
    if bad:
        raise SelectionConfigError(f"metadata key {key!r} is not a finite number for "
                                   f"{len(bad)} samples (e.g. {bad[0][0]}: {bad[0][1]})")
    return values


def objective_of(step: Step, samples: Samples, vectors_here: bool = True) -> Objective:
    """``vectors_here`` False: the vectors are elsewhere (Ray actors): DIVERSITY's data is
    left empty, and the strategies that need every vector here are refused."""
    kind = step.strategy.type
    if kind in ("DIVERSITY", "SIMILARITY", "TYPICALITY") and not vectors_here:
        if kind != "DIVERSITY":
            raise SelectionConfigError(f"{kind} is not distributed yet: run pretag select "
                                       f"without --ray")
        return Objective(step.strategy, "diversity", np.zeros((0, 0), np.float32))
    if kind in ("DIVERSITY", "SIMILARITY", "TYPICALITY"):
        if samples.vectors is None:
            raise SelectionConfigError("EMBEDDINGS needs stored vectors: pretag run "
                                       "--embeddings image (the default)")
        rows = unit(samples.vectors)
        if kind == "DIVERSITY":
            return Objective(step.strategy, "diversity", rows)
        values = (typicality(rows, step.strategy.neighbours) if kind == "TYPICALITY"
                  else similarity(rows, queries(step, samples)))
        return Objective(step.strategy, "weights", values)
    if step.strategy.type == "BALANCE":
        counts, target = _balance_target(step, samples)
        return Objective(step.strategy, "balance", counts, target)
    return Objective(step.strategy, "weights", values_of(step, samples))


def typicality(rows: Rows, k: int) -> np.ndarray:
    """TYPICALITY: the inverse of the mean distance to the ``k`` nearest neighbours (as in
    Lightly, after Hacohen et al., "Active learning on a budget"), scaled so the most
    typical sample has 1."""
    mean = mean_neighbour_distance(np.asarray(rows), k)
    inverse = 1.0 / np.maximum(mean, TINY)
    return inverse / max(float(inverse.max(initial=0.0)), TINY)


def similarity(rows: Rows, query: np.ndarray) -> np.ndarray:
    """SIMILARITY: 1 - (distance to the nearest query vector) / 2, in [0, 1] on unit
    vectors: 1 for a query itself, 0 for the opposite direction."""
    return 1.0 - nearest_distances(normalise(query.copy()), rows) / 2.0


def queries(step: Step, samples: Samples) -> np.ndarray:
    """SIMILARITY's query vectors: the named samples', or an embeddings file's."""
    if step.input.query_embeddings is not None:
        return load_custom(Path(step.input.query_embeddings))[1]
    where = {n: i for i, n in enumerate(samples.names)}
    names = step.input.query_filenames or ()
    missing = [n for n in names if n not in where]
    if missing:
        raise SelectionConfigError(f"query_filenames: {missing[0]} is not a sample of the "
                                   f"run ({len(missing)} of {len(names)} are not)")
    assert samples.vectors is not None
    return np.asarray(take(samples.vectors, np.array([where[n] for n in names], np.intp)),
                      np.float32)
