"""Lightly's ``relevant_filenames_file``: one input a line (a file, or a folder holding
files), relative to INPUT, that a run and a selection are restricted to. No ``./``, no
``../``, no absolute paths: a bad line is an error naming it. A video named there brings
all its frames; a folder everything under it."""

from __future__ import annotations

import posixpath
from collections.abc import Sequence
from pathlib import Path


class RelevantError(ValueError):
    """The file cannot be read, or a line is not a relative path."""


def read_relevant(path: Path) -> tuple[str, ...]:
    """The entries of the file (blank lines and ``#`` comments skipped)."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise RelevantError(f"cannot read relevant_filenames_file {path}: {exc}") from None
    entries = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.rstrip("/").split("/")
        if line.startswith("/") or "\\" in line or any(p in ("", ".", "..") for p in parts):
            raise RelevantError(f"{path} line {number}: {raw!r} is not a relative path "
                                f"inside INPUT (no ./, ../, empty parts or leading /)")
        entries.append(posixpath.join(*parts))
    if not entries:
        raise RelevantError(f"relevant_filenames_file {path} names no input")
    return tuple(entries)


def is_relevant(name: str, entries: Sequence[str]) -> bool:
    """Whether the input ``name`` (relative POSIX path) is an entry or under one."""
    return any(name == entry or name.startswith(entry + "/") for entry in entries)
