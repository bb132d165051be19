"""Data health of a run: corrupt inputs and exact duplicates, found while the job runs and
written as ``report/corrupt.json`` and ``report/duplicates.json``.

* **Corrupt** (Lightly's artifact shape ``{"corrupt_samples": {name: reason},
  "corrupt_videos": {name: reason}}``): an image the server could not decode (its reason is
  the decoder's message), a video that could not be read to its end, and an image or frame
  whose ``uniformRowRatio`` is above the threshold (reason ``"built-in"``, Lightly's word
  for its own checks: a blank, grey-filled or half-decoded frame). Such an image is still
  predicted; ``pretag select`` leaves it out of the candidates.
* **Exact duplicates**: images whose file bytes hash alike (BLAKE2b, 128 bits), grouped;
  the first name of each group (in name order) is the one kept as a candidate. Bytes, not
  pixels: a hash of the bytes costs well under a millisecond per image in the read path and
  needs no decode, and a re-encoded copy is not exact (the near-duplicate search is for
  those). Video frames have no file and are not hashed.

The values live in each prediction entry (``metadata``, ``content_hash``), so a resumed
run counts what earlier runs found without reading any image again.
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pretag.health import DEFAULT_MAX_UNIFORM_ROW_RATIO
from pretag.job.errors import Code
from pretag.job.outputs import write_atomic
from pretag.job.storage import AnyPath

BUILT_IN = "built-in"  # Lightly's reason for a sample its own checks flagged
#: The decoder's words (pretag.preprocess) for a file that is broken, not merely refused
#: (too many pixels is a limit, not corruption).
_BROKEN = ("corrupt or truncated", "unreadable image header", "not a recognised image",
           "empty input", "has no pixels")


def content_hash(data: bytes) -> str:
    """The key exact duplicates share: ``blake2b:<32 hex digits>`` of the file bytes."""
    return "blake2b:" + hashlib.blake2b(data, digest_size=16).hexdigest()


def corrupt_reason(entry: Mapping[str, Any],
                   threshold: float = DEFAULT_MAX_UNIFORM_ROW_RATIO) -> str | None:
    """Why a predicted image counts as corrupt (``"built-in"``: its uniformRowRatio is
    above ``threshold``), or None."""
    metadata = entry.get("metadata")
    if not isinstance(metadata, dict):
        return None
    ratio = metadata.get("uniformRowRatio")
    if isinstance(ratio, (int, float)) and ratio > threshold:
        return BUILT_IN
    return None


def group_summary(groups: list[list[str]]) -> dict[str, list[Any]]:
    """Groups of names (each sorted) as the reports list them: the groups, the first of
    each (kept as a candidate) and all the others (left out)."""
    return {"groups": groups, "kept": [g[0] for g in groups],
            "removed": sorted(n for g in groups for n in g[1:])}


def duplicate_groups(hashes: Mapping[str, str]) -> list[list[str]]:
    """Names sharing a content hash, each group in name order, groups by their first."""
    by_hash: dict[str, list[str]] = defaultdict(list)
    for name, digest in hashes.items():
        by_hash[digest].append(name)
    return sorted((sorted(names) for names in by_hash.values() if len(names) > 1),
                  key=lambda group: group[0])


@dataclass
class Health:
    """What the run found, fed with every prediction entry (resumed or new) and every
    error line."""

    threshold: float = DEFAULT_MAX_UNIFORM_ROW_RATIO
    corrupt: dict[str, str] = field(default_factory=dict)
    hashes: dict[str, str] = field(default_factory=dict)

    def add(self, entry: Mapping[str, Any]) -> None:
        name = entry["filename"]
        reason = corrupt_reason(entry, self.threshold)
        if reason is not None:
            self.corrupt[name] = reason
        digest = entry.get("content_hash")
        if isinstance(digest, str):
            self.hashes[name] = digest

    def report(self, errors: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
        """``corrupt.json``'s content: these entries' findings and the inputs that could
        not be decoded (a server's INVALID_ARGUMENT) or read to their end (a video)."""
        samples = dict(self.corrupt)
        videos: dict[str, str] = {}
        for line in errors:
            reason = str(line.get("reason") or "")
            if line.get("code") == Code.INVALID_ARGUMENT and any(b in reason for b in _BROKEN):
                samples[str(line["filename"])] = reason
            elif line.get("code") == Code.VIDEO:
                videos[str(line["filename"])] = reason or "cannot read"
        return {"corrupt_samples": dict(sorted(samples.items())),
                "corrupt_videos": dict(sorted(videos.items())),
                "uniform_row_ratio_threshold": self.threshold}

    def write(self, report_dir: AnyPath, errors: Sequence[Mapping[str, Any]]) -> None:
        corrupt = self.report(errors)
        write_atomic(report_dir / "corrupt.json", json.dumps(corrupt, indent=1) + "\n")
        duplicates = {**group_summary(duplicate_groups(self.hashes)),
                      "hashed_images": len(self.hashes)}
        write_atomic(report_dir / "duplicates.json", json.dumps(duplicates, indent=1) + "\n")
