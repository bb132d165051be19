"""A run's predictions as selection reads them, and selection/ written as one set."""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pretag.job.health import corrupt_reason, duplicate_groups
from pretag.job.outputs import (
    RESERVED,
    TASK,
    detection_problems,
    entry_of,
    predictions_dir,
    usable,
)
from pretag.selection.config import SelectionConfigError

log = logging.getLogger(__name__)


def run_classes(run_dir: Path) -> list[str]:
    schema = predictions_dir(run_dir) / TASK / "schema.json"
    try:
        classes = [c["name"] for c in json.loads(schema.read_text())["categories"]]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise SelectionConfigError(f"{schema} is not a pretag task schema ({exc})") from None
    if not all(isinstance(c, str) for c in classes):
        raise SelectionConfigError(f"{schema}: category names must be strings")
    return classes


@dataclass
class RunPredictions:
    """A run's prediction files as selection reads them: each entry as written, and the
    detections that cannot be used (bad box, unknown label, non-finite score), which every
    step and export leaves out."""

    classes: list[str]
    entries: dict[str, dict[str, Any]]  # by filename, in the order of the files
    bad: dict[str, dict[int, str]]  # filename -> detection index -> why

    def usable(self, name: str) -> dict[str, Any]:
        return usable(self.entries[name], self.bad.get(name, {}))

    def rejected(self) -> list[dict[str, Any]]:
        return [{"filename": name, "detection": i, "reason": why}
                for name, found in self.bad.items() for i, why in sorted(found.items())]


def read_run(run_dir: Path) -> RunPredictions:
    """Every prediction of a local run, checked as it is read (a file that is not a
    prediction is an error naming it)."""
    root = Path(str(predictions_dir(run_dir))) / TASK  # selection reads local runs only
    classes = run_classes(run_dir)
    entries: dict[str, dict[str, Any]] = {}
    bad: dict[str, dict[int, str]] = {}
    for path in sorted(root.rglob("*.json")):
        if path.relative_to(root).as_posix() in RESERVED:
            continue
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise SelectionConfigError(f"{path} is not a prediction file ({exc})") from None
        entry, problem = entry_of(data)
        if entry is None:
            raise SelectionConfigError(f"{path} is not a prediction file: {problem}")
        entries[entry["filename"]] = entry
        found = detection_problems(entry, classes)
        if found:
            bad[entry["filename"]] = found
    run = RunPredictions(classes, entries, bad)
    if bad:
        first = run.rejected()[0]
        log.warning("%d detections in %d prediction files cannot be used and are left out "
                    "(listed in selection.json; first: %s #%d: %s)", len(run.rejected()),
                    len(bad), first["filename"], first["detection"], first["reason"])
    return run


def near_duplicates(run_dir: Path) -> dict[str, str]:
    """The images ``report/near_duplicates.json`` removes, each with the one it keeps."""
    path = run_dir / "report" / "near_duplicates.json"
    try:
        data = json.loads(path.read_text())
        groups = data["groups"]
        if not all(isinstance(g, list) and all(isinstance(n, str) for n in g) for g in groups):
            raise TypeError("groups must be lists of names")
    except FileNotFoundError:
        raise SelectionConfigError(f"--remove-near-duplicates: {path} does not exist; pretag "
                                   f"run writes it when it stores image vectors") from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise SelectionConfigError(f"{path} cannot be read ({exc})") from None
    return {name: f"near duplicate of {group[0]}" for group in groups for name in group[1:]}


def healthy(run: RunPredictions, threshold: float, near: dict[str, str] | None = None
            ) -> tuple[RunPredictions, dict[str, str]]:
    """``run`` without the images that are no candidates (pretag.job.health): corrupt ones
    (uniformRowRatio above ``threshold``), every exact duplicate but the first of its
    group and the ``near`` duplicates to leave out; and those left out, with why."""
    excluded: dict[str, str] = {n: why for n, why in (near or {}).items() if n in run.entries}
    hashes: dict[str, str] = {}
    for name, entry in run.entries.items():
        reason = corrupt_reason(entry, threshold)
        if reason is not None:
            excluded[name] = f"corrupt ({reason}: uniformRowRatio above {threshold:g})"
        elif isinstance(entry.get("content_hash"), str):
            hashes[name] = entry["content_hash"]
    for group in duplicate_groups(hashes):
        for name in group[1:]:
            excluded[name] = f"exact duplicate of {group[0]}"
    if not excluded:
        return run, excluded
    entries = {n: e for n, e in run.entries.items() if n not in excluded}
    bad = {n: b for n, b in run.bad.items() if n not in excluded}
    log.info("%d images are no candidates: %d corrupt, %d exact and %d near duplicates "
             "(listed in selection/excluded.json)", len(excluded),
             sum(r.startswith("corrupt") for r in excluded.values()),
             sum(r.startswith("exact") for r in excluded.values()),
             sum(r.startswith("near") for r in excluded.values()))
    return RunPredictions(run.classes, entries, bad), excluded


def lightly_metadata(run: RunPredictions) -> dict[str, dict[str, Any]]:
    """Each image's pixel metadata as METADATA inputs name it: ``lightly.<key>``."""
    return {name: {f"lightly.{k}": v for k, v in entry["metadata"].items()}
            for name, entry in run.entries.items() if isinstance(entry.get("metadata"), dict)}


@contextmanager
def staged(base: Path) -> Iterator[Path]:
    """A folder for a selection's outputs, made ``base/selection`` as one set when the
    block ends: written aside (``.selection.new``), then swapped in with two renames, the
    old set removed. A killed selection leaves the old set whole (or, killed between the
    renames, none: never a mix); leftovers are cleared by the next one. On an error the
    new set is dropped and the old one stays."""
    final, new, old = base / "selection", base / ".selection.new", base / ".selection.old"
    for leftover in (new, old):
        shutil.rmtree(leftover, ignore_errors=True)
    new.mkdir(parents=True)
    try:
        yield new
    except BaseException:
        shutil.rmtree(new, ignore_errors=True)
        raise
    if final.exists():
        final.replace(old)
    new.replace(final)
    shutil.rmtree(old, ignore_errors=True)
