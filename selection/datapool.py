"""Lightly's datapool for a run folder (``worker_config.use_datapool: true``): every
selection's picks are recorded in ``DIR/datapool.json``, and the next selection takes them
into account: they are not picked again, DIVERSITY starts with them as centres, BALANCE
with their class counts (THRESHOLD and WEIGHTS are unchanged).

The record says what the picks were made with: the model (name and source sha256), the
level (images, or detections of a task) and the vector size; a selection made otherwise is
refused, naming the difference. It is replaced atomically after the selection's folder is,
so a killed selection leaves it as it was, and running the same selection again picks the
same samples and then records them. Without ``use_datapool`` a folder with a record is
refused (Lightly aborts on a dataset that is not empty): remove the record to start over.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from pretag.job.outputs import read_settings, write_atomic
from pretag.selection.config import SelectionConfig, SelectionConfigError
from pretag.selection.samples import Samples

log = logging.getLogger(__name__)

RECORD = "datapool.json"
VERSION = 1


def read_pool(base: Path) -> dict[str, Any] | None:
    path = base / RECORD
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
        if record.get("version") != VERSION or not isinstance(record.get("selections"), list):
            raise ValueError(f"not a version {VERSION} datapool record")
    except (OSError, ValueError) as exc:
        raise SelectionConfigError(f"cannot read the datapool record {path}: {exc}") from None
    return dict(record)


def identity(run_dir: Path, samples: Samples, config: SelectionConfig) -> dict[str, Any]:
    """What the picks are made with: model, level, vector size."""
    settings = read_settings(run_dir) or {}
    return {"model": settings.get("model"), "source_sha256": settings.get("source_sha256"),
            "level": (f"objects:{config.object_level_task}" if config.object_level_task
                      else "images"),
            "vector_dim": int(samples.vectors.shape[1]) if samples.vectors is not None else 0}


def earlier_picks(base: Path, config: SelectionConfig, ident: dict[str, Any],
                  samples: Samples) -> tuple[dict[str, Any] | None, np.ndarray, list[str]]:
    """The record, the rows of ``samples`` picked before and the earlier picks no longer
    among the samples (their prediction or vector deleted since). Refuses a folder with a
    record when the config does not use it, and a record made otherwise."""
    record = read_pool(base)
    if record is None:
        return None, np.zeros(0, np.intp), []
    names = all_picks(record)
    if not config.use_datapool:
        raise SelectionConfigError(
            f"{base / RECORD} records {len(names)} samples picked by "
            f"{len(record['selections'])} earlier selections: set worker_config.use_datapool: "
            f"true to pick new samples beside them, or remove {RECORD} to start over")
    differ = [f"{key} {record['made_with'].get(key)!r} -> {ident[key]!r}" for key in ident
              if record["made_with"].get(key) != ident[key]]
    if differ:
        raise SelectionConfigError(f"{base / RECORD} was made with other settings "
                                   f"({'; '.join(differ)}): use another --output-dir, or "
                                   f"remove {RECORD} to start over")
    where = {name: row for row, name in enumerate(samples.names)}
    missing = [name for name in names if name not in where]
    if missing:
        log.warning("%d earlier picks are no longer in the run (their prediction or vector "
                    "was deleted), e.g. %s: they do not count", len(missing), missing[0])
    return record, np.array(sorted(where[n] for n in names if n in where), np.intp), missing


def all_picks(record: dict[str, Any]) -> list[str]:
    return [name for selection in record["selections"] for name in selection["picks"]]


def write_pool(base: Path, record: dict[str, Any] | None, ident: dict[str, Any],
               config: SelectionConfig, picks: list[str]) -> dict[str, Any]:
    """The record with this selection added, written atomically."""
    selections = list(record["selections"]) if record else []
    selections.append({"at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                       "config": asdict(config), "picks": picks})
    new = {"version": VERSION, "made_with": ident, "selections": selections}
    write_atomic(base / RECORD, json.dumps(new, indent=1) + "\n")
    return new
