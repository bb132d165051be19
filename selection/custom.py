"""Custom embeddings (``worker_config.embeddings`` / ``pretag select --embeddings FILE``):
vectors of the user's own model, used instead of the run's.

Lightly's ``embeddings.csv``: a header ``filenames,embedding_0,...,embedding_{D-1},labels``
(``labels`` optional and unused), one row per file. Or Parquet: a ``filename`` (or
``filenames``) column with either an ``embedding`` list column or ``embedding_i`` columns.
Rows are matched to the run's samples by file name; rows for files the run does not hold
are reported and left out, samples without a row stop the selection (exit 2)."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import numpy as np

from pretag.selection.config import SelectionConfigError

log = logging.getLogger(__name__)

_COLUMN = re.compile(r"^embedding_(\d+)$")


def _table(path: Path) -> Any:
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    try:
        if path.suffix.lower() == ".parquet":
            return pq.read_table(path)
        return pacsv.read_csv(path)
    except Exception as exc:  # pyarrow raises ArrowInvalid and OSError subclasses
        raise SelectionConfigError(f"cannot read the embeddings file {path}: {exc}") from None


def load_custom(path: Path) -> tuple[list[str], np.ndarray]:
    """(file names, vectors [N, D] float32) of an embeddings file; SelectionConfigError
    naming the file for anything malformed."""
    table = _table(path)
    names_column = next((c for c in ("filenames", "filename") if c in table.column_names),
                        None)
    if names_column is None:
        raise SelectionConfigError(f"{path}: no filenames column (Lightly's embeddings.csv "
                                   f"starts filenames,embedding_0,...)")
    names = [str(n) for n in table[names_column].to_pylist()]
    numbered = sorted((int(m.group(1)), c) for c in table.column_names
                      if (m := _COLUMN.match(c)))
    if numbered:
        if [i for i, _ in numbered] != list(range(len(numbered))):
            raise SelectionConfigError(f"{path}: the embedding_i columns must run from "
                                       f"embedding_0 to embedding_{len(numbered) - 1}")
        try:
            vectors = np.column_stack([table[c].to_numpy().astype(np.float32)
                                       for _, c in numbered])
        except (TypeError, ValueError) as exc:
            raise SelectionConfigError(f"{path}: embedding values must be numbers "
                                       f"({exc})") from None
    elif "embedding" in table.column_names:
        rows = table["embedding"].to_pylist()
        sizes = {len(r) if r is not None else -1 for r in rows}
        if len(sizes) != 1 or -1 in sizes:
            raise SelectionConfigError(f"{path}: every embedding must have the same size")
        vectors = np.asarray(rows, dtype=np.float32).reshape(len(rows), -1)
    else:
        raise SelectionConfigError(f"{path}: no embedding_0.. columns and no embedding column")
    if not len(names) or not vectors.shape[1]:
        raise SelectionConfigError(f"{path} holds no embeddings")
    bad = np.flatnonzero(~np.isfinite(vectors).all(axis=1))
    if len(bad):
        raise SelectionConfigError(f"{path}: {len(bad)} rows hold a value that is not a "
                                   f"finite number (first: {names[bad[0]]})")
    if len(set(names)) != len(names):
        twice = next(n for n in names if names.count(n) > 1)
        raise SelectionConfigError(f"{path}: {twice} has more than one row")
    return names, vectors


def custom_vectors(path: Path, samples: list[str]) -> np.ndarray:
    """The file's vectors in the order of ``samples``; extra rows reported, missing ones
    refused."""
    names, vectors = load_custom(path)
    where = {n: i for i, n in enumerate(names)}
    missing = [n for n in samples if n not in where]
    if missing:
        raise SelectionConfigError(f"{path} has no row for {len(missing)} of the run's "
                                   f"{len(samples)} images (e.g. {missing[0]})")
    extra = len(names) - len(samples)  # the names are unique and hold every sample
    if extra:
        known = set(samples)
        example = next(n for n in names if n not in known)
        log.warning("%s: %d rows name files the run does not hold (e.g. %s): left out",
                    path, extra, example)
    return vectors[[where[n] for n in samples]]
