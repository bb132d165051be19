"""The selection report's data-health part and its picture grids: what was left out and
why (corrupt, exact and near duplicates), the samples not sent to labelling, class shares
before, after and the target side by side, and bounded thumbnail grids of the picks and of
the images left out.

Bounds: at most :data:`MAX_PICK_THUMBNAILS` thumbnails of the picks,
:data:`MAX_EXCLUDED_THUMBNAILS` of the excluded images and :data:`MAX_PAIRS` kept/left-out
duplicate pairs, each at most :data:`THUMB_PX` on
its longer side as JPEG quality 70 (a few KB), and :data:`MAX_LISTED` excluded names in the
page (all of them are in selection/excluded.json), so the page stays a few MB whatever the
run's size.
"""

from __future__ import annotations

import base64
import html
import logging
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from pretag.job.video import SampleImages, VideoError

log = logging.getLogger(__name__)

MAX_PICK_THUMBNAILS = 48
MAX_EXCLUDED_THUMBNAILS = 12
MAX_LISTED = 50
MAX_PAIRS = 6  # kept images shown beside a duplicate left out
THUMB_PX = 160


def health_record(excluded: Mapping[str, str], candidates: int, selected: int
                  ) -> dict[str, Any]:
    """report.json's ``data_health``: counts, and the first excluded names with why."""
    kinds = Counter(reason.split(" ", 1)[0] for reason in excluded.values())
    return {"excluded": len(excluded), "corrupt": kinds.get("corrupt", 0),
            "exact_duplicates": kinds.get("exact", 0), "near_duplicates": kinds.get("near", 0),
            "candidates": candidates, "selected": selected,
            "not_sent_to_labelling": candidates - selected,
            "first_excluded": dict(list(sorted(excluded.items()))[:MAX_LISTED])}


def shares_chart(plot: Any, target: Mapping[str, float], before: Mapping[str, float],
                 after: Mapping[str, float]) -> bytes:
    """Grouped bars: each target bucket's share before, after and wanted."""
    names = [*target, "others"]

    def bucket(shares: Mapping[str, float]) -> list[float]:
        listed = [shares.get(c, 0.0) for c in target]
        return [*listed, max(0.0, sum(shares.values()) - sum(listed))]

    wanted = [*target.values(), max(0.0, 1.0 - sum(target.values()))]

    def draw(ax: Any) -> None:
        x = np.arange(len(names))
        for k, (label, values) in enumerate((("before", bucket(before)),
                                             ("after", bucket(after)), ("target", wanted))):
            ax.bar(x + (k - 1) * 0.27, values, 0.27, label=label)
        ax.set_xticks(x, names, rotation=30)
        ax.set_ylabel("share of objects")
        ax.set_title("class shares: before, after and the BALANCE target")
        ax.legend()

    return bytes(plot(draw))


def fit(image: np.ndarray, longest: int) -> np.ndarray:
    """``image`` scaled down (area interpolation) to at most ``longest`` pixels on its
    longer side; as it is when it is smaller."""
    scale = longest / max(image.shape[:2])
    if scale >= 1:
        return image
    return cv2.resize(image, (max(1, round(image.shape[1] * scale)),
                              max(1, round(image.shape[0] * scale))),
                      interpolation=cv2.INTER_AREA)


def thumbnails(images: Path | None, names: Sequence[str], limit: int,
               captions: Mapping[str, str] | None = None) -> list[str]:
    """``<figure>`` tags of the first ``limit`` names that can be read, small JPEGs."""
    if images is None:
        return []
    source = SampleImages(images)
    tags: list[str] = []
    for name in names:
        if len(tags) >= limit:
            break
        if not source.exists(name):
            continue
        try:
            image = source.read_bgr(name)
        except (OSError, ValueError, VideoError) as exc:
            log.warning("no thumbnail of %s: %s", name, exc)
            continue
        ok, jpeg = cv2.imencode(".jpg", fit(image, THUMB_PX), [cv2.IMWRITE_JPEG_QUALITY, 70])
        if not ok:
            continue
        caption = html.escape(name + (f": {captions[name]}" if captions and name in captions
                                      else ""))
        data = base64.b64encode(jpeg.tobytes()).decode()
        tags.append(f'<figure><img class=thumb alt="{html.escape(name)}" '
                    f'src="data:image/jpeg;base64,{data}"><figcaption>{caption}'
                    f'</figcaption></figure>')
    return tags


def pair_thumbnails(images: Path | None, excluded: Mapping[str, str]) -> list[str]:
    """Kept images beside a duplicate of theirs that was left out (exact or near), each
    pair one row: what the selection did not lose."""
    rows: list[str] = []
    for name, reason in sorted(excluded.items()):
        if len(rows) >= MAX_PAIRS:
            break
        kept = reason.split(" duplicate of ", 1)[1] if " duplicate of " in reason else None
        if kept is None:
            continue
        rows += _pair_row(images, kept, name, "kept", reason)
    return rows


def _pair_row(images: Path | None, first: str, second: str, first_caption: str,
              second_caption: str) -> list[str]:
    """Two thumbnails side by side as one row (none when either cannot be read)."""
    tags = thumbnails(images, [first, second], 2,
                      {first: first_caption, second: second_caption})
    return [f"<div class=row>{''.join(tags)}</div>"] if len(tags) == 2 else []


def retained_thumbnails(images: Path | None, pairs: Sequence[Mapping[str, Any]]
                        ) -> list[str]:
    """Each ``{kept, removed, distance}`` pair as one row of two thumbnails: a pick
    beside its nearest sample that was not selected (Lightly's retained/removed
    neighbours)."""
    rows: list[str] = []
    for pair in pairs[:MAX_PAIRS]:
        rows += _pair_row(images, pair["kept"], pair["removed"], "selected",
                          f"not selected, distance {pair['distance']:.3f}")
    return rows


def health_section(record: Mapping[str, Any], excluded_tags: list[str],
                   pairs: Sequence[str] = ()) -> str:
    """The page's data-health section."""
    health = record.get("data_health")
    if health is None:
        return ""
    listed = "".join(f"<tr><td>{html.escape(n)}</td><td>{html.escape(r)}</td></tr>"
                     for n, r in health["first_excluded"].items())
    more = health["excluded"] - len(health["first_excluded"])
    return (f"<h2>Data health</h2><p>{health['candidates']} candidates after leaving out "
            f"{health['excluded']} images ({health['corrupt']} corrupt, "
            f"{health['exact_duplicates']} exact and {health['near_duplicates']} near "
            f"duplicates); {health['selected']} selected, {health['not_sent_to_labelling']} "
            f"not sent to labelling.</p>"
            + (f"<table><tr><th>left out</th><th>why</th></tr>{listed}</table>" if listed
               else "")
            + (f"<p>... and {more} more (selection/excluded.json).</p>" if more > 0 else "")
            + (f"<div class=row>{''.join(excluded_tags)}</div>" if excluded_tags else "")
            + (f"<h3>Kept, beside a duplicate left out</h3>{''.join(pairs)}" if pairs else ""))
