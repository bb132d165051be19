"""The selection as a function of arrays, for users with their own vectors and counts:
the same loop ``pretag select`` runs (``from pretag.selection import select``)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from pretag.selection.config import SelectionConfig, SelectionConfigError, parse
from pretag.selection.rows import normalise
from pretag.selection.run import select as run_select
from pretag.selection.samples import Samples


def select(config: SelectionConfig | Mapping[str, Any], embeddings: Any = None,
           class_counts: Any = None, classes: Sequence[str] | None = None,
           scores: Sequence[Any] | None = None,
           metadata: Sequence[Mapping[str, Any]] | None = None,
           probabilities: Sequence[Any] | None = None) -> list[int]:
    """Indices of the picked samples, in pick order.

    ``config``: a parsed :class:`SelectionConfig` or the dict Lightly users write
    (``{"selection_config": ...}`` or a ``selection_config`` alone). Per sample, as each
    strategy needs them: ``embeddings`` [N, D] (DIVERSITY; copied, not changed: float16
    stays float16, anything else becomes float32; the loop's distances are those of the
    rows rounded to float16, as a run stores them), ``class_counts`` [N, C] with
    ``classes`` naming the columns (BALANCE, PREDICTIONS inputs), ``scores`` (one sequence of
    detection scores per sample: SCORES inputs), ``metadata`` (one dict per sample:
    METADATA inputs), ``probabilities`` (per sample, its detections' class probabilities
    [n, C]: the uncertainty_* SCORES). SelectionConfigError when the config or the arrays
    cannot work."""
    cfg = config if isinstance(config, SelectionConfig) else parse(dict(config))
    sizes = {name: len(value) for name, value in (("embeddings", embeddings),
                                                  ("class_counts", class_counts),
                                                  ("scores", scores), ("metadata", metadata),
                                                  ("probabilities", probabilities))
             if value is not None}
    if not sizes:
        raise SelectionConfigError("select needs at least one of embeddings, class_counts, "
                                   "scores and metadata")
    if len(set(sizes.values())) != 1:
        raise SelectionConfigError(f"the arrays disagree on the number of samples: {sizes}")
    n = next(iter(sizes.values()))
    counts = (np.zeros((n, 0)) if class_counts is None
              else np.asarray(class_counts, dtype=float).reshape(n, -1))
    names = list(classes) if classes is not None else [str(i) for i in range(counts.shape[1])]
    if len(names) != counts.shape[1]:
        raise SelectionConfigError(f"{len(names)} classes name {counts.shape[1]} columns")
    vectors = None
    if embeddings is not None:
        given = np.asarray(embeddings)  # float16 stays float16 (2 bytes a value)
        width = int(np.prod(given.shape[1:]))  # one row a sample (-1 fails on no rows)
        vectors = normalise(np.array(given, dtype=np.float16 if given.dtype == np.float16
                                     else np.float32).reshape(n, width))
        if not np.isfinite(vectors).all():
            raise SelectionConfigError("embeddings must be finite numbers")
    ids = [str(i) for i in range(n)]
    samples = Samples(ids, names, counts,
                      [np.asarray(s, dtype=float) for s in scores] if scores is not None
                      else [np.zeros(0) for _ in range(n)], vectors,
                      {ids[i]: dict(m) for i, m in enumerate(metadata)} if metadata else {},
                      None if probabilities is None else
                      [np.asarray(p, dtype=float).reshape(len(p), -1) if len(p)
                       else np.zeros((0, counts.shape[1])) for p in probabilities])
    return [p.index for p in run_select(cfg, samples)]
