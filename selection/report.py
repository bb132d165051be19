"""The selection report: class histograms before and after, report.json, and report.html.

report.html is one self-contained page (images inlined as data URIs, no external
request): run settings, the histograms side by side, objects per image, debug images of
picked images, and the embedding figures of :mod:`pretag.selection.report_embeddings`.
An inline script marks ``<body data-images="ok">`` once every image has rendered (the
browser test reads it).
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from pretag.job.outputs import (
    detection_problems,
    read_prediction,
    usable,
    write_atomic,
)
from pretag.job.report import draw_debug_image
from pretag.job.stats import bar_chart, class_stats
from pretag.job.video import SampleImages, VideoError
from pretag.selection.report_embeddings import figures
from pretag.selection.report_health import (
    MAX_EXCLUDED_THUMBNAILS,
    MAX_PICK_THUMBNAILS,
    THUMB_PX,
    fit,
    health_record,
    health_section,
    pair_thumbnails,
    retained_thumbnails,
    shares_chart,
    thumbnails,
)
from pretag.selection.samples import Samples

log = logging.getLogger(__name__)

PAGE_IMAGE_PX = 960  # the six drawn picks in the page, longer side


def class_stats_of(samples: Samples, rows: np.ndarray) -> dict[str, Any]:
    return class_stats(samples.classes, samples.counts[rows])


def _plot(draw: Any, size: tuple[float, float] = (6.4, 3.6)) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=size, layout="constrained")
    draw(ax)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def _histogram(stats: dict[str, Any], title: str) -> bytes:
    objects = stats["objects_per_class"]
    return bar_chart(list(objects), list(objects.values()),
                     f"{title}: {stats['samples']} samples, "
                     f"{stats['average_objects_per_sample']:.2f} objects each")


def _img(data: bytes, kind: str, alt: str) -> str:
    encoded = base64.b64encode(data).decode()
    return f'<img alt="{html.escape(alt)}" src="data:image/{kind};base64,{encoded}">'


def _debug_images(run_dir: Path, images: Path | None, names: list[str], out: Path,
                  classes: list[str]) -> list[str]:
    """The first picks drawn with their usable boxes (an earlier selection's drawings
    are removed first)."""
    shutil.rmtree(out / "selected", ignore_errors=True)
    if images is None:
        return []
    samples = SampleImages(images)
    tags = []
    for name in names[:6]:
        entry = read_prediction(run_dir, name)
        if entry is None or not samples.exists(name):
            continue
        entry = usable(entry, detection_problems(entry, classes))
        target = out / "selected" / name.replace("/", "__")
        try:
            draw_debug_image(samples.read_bgr(name), entry, target.with_suffix(".jpg"), [])
        except (OSError, ValueError, VideoError) as exc:
            log.warning("no drawing of %s: %s", name, exc)
            continue
        tags.append(_img(_shrunk(target.with_suffix(".jpg")), "jpeg", name))
    return tags


def _shrunk(path: Path) -> bytes:
    """The drawing as inlined in the page: at most :data:`PAGE_IMAGE_PX` on its longer
    side (the full-size drawing stays in report/selected/)."""
    image = cv2.imread(str(path))
    if image is None or max(image.shape[:2]) <= PAGE_IMAGE_PX:
        return path.read_bytes()
    small = fit(image, PAGE_IMAGE_PX)
    return bytes(cv2.imencode(".jpg", small, [cv2.IMWRITE_JPEG_QUALITY, 85])[1].tobytes())


@dataclass(frozen=True)
class Earlier:
    """A datapool's earlier picks: their rows among the samples, and those gone since."""

    rows: list[int]
    missing: list[str]


def _embedding_part(samples: Samples, rows: np.ndarray, earlier: Earlier | None,
                    record: dict[str, Any], report_dir: Path
                    ) -> tuple[str, list[dict[str, Any]]]:
    """The embedding figures: into ``record``, the distance PNGs beside report.json, and
    the page's section; returns it and the retained/removed pairs by name."""
    assert samples.vectors is not None
    figs, figures_record = figures(_plot, samples.vectors, rows, None if earlier is None
                                   else np.array(earlier.rows, dtype=int))
    retained = [{"kept": samples.names[k], "removed": samples.names[r], "distance": d}
                for k, r, d in figures_record.pop("retained_beside_removed")]
    record.update(figures_record, retained_beside_removed=retained)
    for key in ("distance_distr_before", "distance_distr_after"):
        (report_dir / f"{key}.png").write_bytes(figs[key])
    images = [(figs["map"], "PCA map"), (figs["nearest"], "nearest-neighbour distances"),
              (figs["distance_distr_before"], "pairwise distances before"),
              (figs["distance_distr_after"], "pairwise distances after")]
    tags = [_img(data, "png", alt) for data, alt in images]
    return (f"<h2>Embeddings</h2><div class=row>{''.join(tags[:2])}</div>"
            f"<div class=row>{''.join(tags[2:])}</div>"), retained


def write_report(run_dir: Path, out_dir: Path, samples: Samples, picked: list[int],
                 target: dict[str, float] | None, images: Path | None = None,
                 earlier: Earlier | None = None,
                 excluded: dict[str, str] | None = None) -> dict[str, Any]:
    """report/report.json, the histograms and report/report.html under ``out_dir``
    (with a datapool: also the earlier picks', and both together; ``excluded``: the
    images left out of the candidates, with why)."""
    report_dir = out_dir / "report"
    report_dir.mkdir(parents=True, exist_ok=True)
    rows = np.array(picked, dtype=int)
    before = class_stats_of(samples, np.arange(len(samples.names)))
    after = class_stats_of(samples, rows)
    record: dict[str, Any] = {"before": before, "after": after,
                              "data_health": health_record(excluded or {}, len(samples.names),
                                                           len(picked))}
    pngs = {}
    if earlier is not None:
        prior = np.array(earlier.rows, dtype=int)
        record["datapool"] = {
            "earlier": class_stats_of(samples, prior),
            "both": class_stats_of(samples, np.concatenate([prior, rows])),
            "earlier_missing": earlier.missing}
        for key in ("earlier", "both"):
            pngs[key] = _histogram(record["datapool"][key], key)
    if target:  # over the same buckets as BALANCE: listed classes, then all the others
        wanted = np.array([*target.values(), max(0.0, 1.0 - sum(target.values()))])
        compared = [("before", before), ("after", after)]
        if "datapool" in record:
            compared.append(("both", record["datapool"]["both"]))
        for key, stats in compared:
            shares = stats["class_distribution"]
            listed = [shares.get(c, 0.0) for c in target]
            got = np.array([*listed, max(0.0, sum(shares.values()) - sum(listed))])
            record[f"gap_to_target_{key}"] = float(np.abs(got - wanted).sum())
        record["target"] = target
        pngs["shares"] = shares_chart(_plot, target, before["class_distribution"],
                                      after["class_distribution"])
    pngs = {"before": _histogram(before, "before"), "after": _histogram(after, "after"),
            **pngs}
    for key, data in pngs.items():
        (report_dir / f"pretagging_histogram_{key}.png").write_bytes(data)
    maps, retained = "", list[dict[str, Any]]()
    if samples.vectors is not None and len(samples.names):
        maps, retained = _embedding_part(samples, rows, earlier, record, report_dir)
    write_atomic(report_dir / "report.json", json.dumps(record, indent=1) + "\n")
    names = [samples.names[i] for i in picked]
    debug = _debug_images(run_dir, images, names, report_dir, samples.classes)
    grids = (thumbnails(images, names, MAX_PICK_THUMBNAILS),
             thumbnails(images, sorted(excluded or {}), MAX_EXCLUDED_THUMBNAILS, excluded),
             pair_thumbnails(images, excluded or {}), retained_thumbnails(images, retained))
    write_atomic(report_dir / "report.html",
                 _page(run_dir, record, pngs, maps, debug, grids))
    return record


_SCRIPT = """window.addEventListener("load", () => {
  const bad = [...document.images].filter(i => !i.complete || i.naturalWidth === 0);
  document.body.dataset.images = bad.length === 0 ? "ok" : "broken:" + bad.length;
});"""


def _page(run_dir: Path, record: dict[str, Any], pngs: dict[str, bytes], maps: str,
          debug: list[str],
          grids: tuple[list[str], list[str], list[str], list[str]] = ([], [], [], [])
          ) -> str:
    settings_path = run_dir / "report" / "run_settings.json"
    settings = settings_path.read_text() if settings_path.is_file() else "{}"
    before, after = record["before"], record["after"]
    rows = "".join(
        f"<tr><td>{html.escape(k)}</td><td>{before['objects_per_class'][k]}</td>"
        f"<td>{after['objects_per_class'][k]}</td></tr>" for k in before["objects_per_class"])
    gap = ""
    if "target" in record:
        gap = (f"<p>L1 gap to the target distribution: {record['gap_to_target_before']:.3f} "
               f"before, {record['gap_to_target_after']:.3f} after"
               + (f", {record['gap_to_target_both']:.3f} with the earlier picks"
                  if "gap_to_target_both" in record else "") + ".</p>"
               + _img(pngs["shares"], "png", "class shares before, after and target"))
    pool = ""
    if "datapool" in record:
        earlier, both = record["datapool"]["earlier"], record["datapool"]["both"]
        gone = len(record["datapool"]["earlier_missing"])
        pool = (f"<h2>Datapool</h2><p>{earlier['samples']} samples picked by earlier "
                f"selections, {after['samples']} now, {both['samples']} together"
                + (f"; {gone} earlier picks are no longer in the run" if gone else "")
                + f".</p><div class=row>{_img(pngs['earlier'], 'png', 'earlier picks')}"
                f"{_img(pngs['both'], 'png', 'earlier and this selection')}</div>")
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>pretag selection report</title>
<style>body{{font-family:sans-serif;margin:2em}} img{{max-width:48%;margin:4px}}
.row{{display:flex;flex-wrap:wrap}} td,th{{padding:2px 10px;text-align:right}}
img.thumb{{max-width:{THUMB_PX}px}} figure{{margin:4px;font-size:70%;width:{THUMB_PX}px}}</style>
<script>{_SCRIPT}</script></head>
<body data-images="pending"><h1>Selection report</h1>
<p>{before['samples']} samples before, {after['samples']} selected. Objects per sample:
{before['average_objects_per_sample']:.2f} before, {after['average_objects_per_sample']:.2f}
after.</p>{gap}
<h2>Class histograms</h2><div class=row>{_img(pngs['before'], 'png', 'before')}
{_img(pngs['after'], 'png', 'after')}</div>
<table><tr><th>class</th><th>before</th><th>after</th></tr>{rows}</table>
{pool}
{maps}
{"<h3>Selected, beside the nearest sample not selected</h3>" + "".join(grids[3])
 if grids[3] else ""}
{health_section(record, grids[1], grids[2])}
<h2>Selected images</h2><div class=row>{''.join(debug) or '<p>(pass --images to draw)</p>'}</div>
{f"<h2>All picks (first {len(grids[0])})</h2><div class=row>{''.join(grids[0])}</div>"
 if grids[0] else ""}
<h2>Run settings</h2><pre>{html.escape(settings)}</pre>
</body></html>
"""
