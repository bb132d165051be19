"""Selection outputs under faults (issue 29): a re-selection replaces the whole set, a
failed one leaves the old set, bad boxes in prediction files are reported and never
written, malformed metadata and empty runs are exit 2.

Each test failed on the code before the fix (a57afb3).
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path

import cv2
import pytest
from pycocotools.coco import COCO

from pretag.cli import main
from pretag.job.outputs import TASK

pytestmark = pytest.mark.slow  # see the README: pytest -m "not slow"

DIVERSITY = {"strategies": [{"input": {"type": "EMBEDDINGS"},
                             "strategy": {"type": "DIVERSITY"}}]}
OBJECTS = {"worker_config": {"object_level": {"task_name": "lightly_pretagging"}},
           "selection_config": DIVERSITY}


@pytest.fixture(scope="module")
def images(coco128: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("sel-images")
    for path in sorted((coco128 / "images").rglob("*.jpg"))[:24]:
        shutil.copy(path, folder / path.name)
    return folder


@pytest.fixture()
def run(images: Path, yolox_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh run with image and object vectors (tests edit its files)."""
    out = tmp_path_factory.mktemp("sel-run")
    assert main(["run", str(images), "--output-dir", str(out), "--model", str(yolox_model),
                 "--embeddings", "all", "--score-threshold", "0.3", "--quiet"]) == 0
    return out


def _config(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / f"config-{len(list(tmp_path.glob('config-*')))}.json"
    path.write_text(json.dumps(data))
    return path


def _select(run: Path, config: Path, n: int, *more: str) -> int:
    return main(["select", str(run), "--config", str(config), "--n-samples", str(n), *more])


def test_a_reselection_replaces_every_output(run: Path, images: Path, tmp_path: Path):
    objects, plain = _config(tmp_path, OBJECTS), _config(tmp_path, DIVERSITY)
    selection = run / "selection"
    assert _select(run, objects, 20, "--images", str(images), "--write-crops") == 0
    assert len(list((selection / "crops").glob("*.png"))) == 20
    assert _select(run, objects, 5, "--images", str(images), "--write-crops") == 0
    assert len(list((selection / "crops").glob("*.png"))) == 5  # before: 20 for 5 picks
    picked = (selection / "selected.txt").read_text().splitlines()
    assert sorted(p.name[:-4] for p in (selection / "crops").glob("*.png")) == sorted(picked)

    assert _select(run, plain, 10, "--images", str(images), "--export", "lightly") == 0
    exported = selection / "lightly" / ".lightly" / "predictions" / TASK
    assert len([p for p in exported.glob("*.json") if p.name != "schema.json"]) == 10
    assert _select(run, plain, 3, "--images", str(images), "--export", "lightly") == 0
    assert len([p for p in exported.glob("*.json") if p.name != "schema.json"]) == 3
    assert not (selection / "crops").exists()  # the object-level set is gone with it
    assert len(json.loads((selection / "selection.json").read_text())["picks"]) == 3
    assert len(list((run / "report" / "selected").glob("*.jpg"))) == 3


def test_a_selection_that_fails_midway_leaves_the_old_set(run: Path, images: Path,
                                                          tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch):
    """As a kill between writing selected.txt and selection.json did (5 names beside 20
    picks): the new set is written aside, so the old one stays whole."""
    plain = _config(tmp_path, DIVERSITY)
    assert _select(run, plain, 20) == 0
    before = {p.name: p.read_bytes() for p in (run / "selection").iterdir()}
    from pretag.selection import run as selection_run

    def broken(*args: object, **kwargs: object) -> None:
        raise OSError("disk gone while exporting")

    monkeypatch.setattr(selection_run, "export_coco", broken)
    assert _select(run, plain, 5, "--images", str(images), "--export", "coco") == 2
    assert {p.name: p.read_bytes() for p in (run / "selection").iterdir()} == before
    assert not (run / ".selection.new").exists()
    (run / ".selection.new").mkdir()  # as a SIGKILL leaves it
    (run / ".selection.new" / "selected.txt").write_text("half\n")
    monkeypatch.undo()
    assert _select(run, plain, 5) == 0
    assert len((run / "selection" / "selected.txt").read_text().splitlines()) == 5
    assert not (run / ".selection.new").exists() and not (run / ".selection.old").exists()


def _edit(run: Path, name: str, boxes: list) -> None:
    path = run / ".lightly" / "predictions" / TASK / Path(name).with_suffix(".json")
    entry = json.loads(path.read_text())[0]
    for i, box in enumerate(boxes):
        entry["boxes"][i] = box
    path.write_text(json.dumps([entry]))


def _with_detections(run: Path, count: int) -> list[str]:
    root = run / ".lightly" / "predictions" / TASK
    found = [json.loads(p.read_text())[0] for p in sorted(root.glob("*.json"))
             if p.name != "schema.json"]
    return [e["filename"] for e in found if len(e["boxes"]) >= count]


def test_bad_boxes_are_reported_and_never_written(run: Path, images: Path, tmp_path: Path):
    a, b = _with_detections(run, 2)[:2]
    _edit(run, a, [[0.5, 0.5, 1.7, 0.9], [0.6, 0.2, 0.3, 0.4]])  # outside; inverted
    _edit(run, b, [[-0.4, -0.3, -0.1, -0.05], [math.nan, 0.1, 0.2, 0.3]])  # negative; NaN
    rejected = {(a, 0), (a, 1), (b, 0), (b, 1)}
    objects = _config(tmp_path, OBJECTS)
    # every crop: before, a cv2.error with half the crops written, or a silent 1x1 crop
    assert _select(run, objects, 1000, "--images", str(images), "--write-crops") == 0
    record = json.loads((run / "selection" / "selection.json").read_text())
    assert {(r["filename"], r["detection"]) for r in record["rejected_detections"]} == rejected
    crops = (run / "selection" / "selected.txt").read_text().splitlines()
    names = {f"{Path(n).stem}-{i}-jpg" for n, i in rejected}
    assert crops and not names & set(crops)
    for crop in crops:
        image = cv2.imread(str(run / "selection" / "crops" / f"{crop}.png"))
        assert image is not None and min(image.shape[:2]) >= 1

    plain = _config(tmp_path, DIVERSITY)
    assert _select(run, plain, 1000, "--images", str(images), "--export", "coco") == 0
    text = (run / "selection" / "coco.json").read_text()
    coco_json = json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in coco.json"))
    coco = COCO(str(run / "selection" / "coco.json"))
    assert len(coco.getImgIds()) == 24
    for ann in coco_json["annotations"]:
        x, y, w, h = ann["bbox"]
        image = coco.imgs[ann["image_id"]]
        assert x >= 0 and y >= 0 and w >= 0 and h >= 0
        assert x + w <= image["width"] + 0.01 and y + h <= image["height"] + 0.01
    by_name = {i["file_name"]: i["id"] for i in coco_json["images"]}
    kept = {name: len(coco.getAnnIds(imgIds=[by_name[name]])) for name in (a, b)}
    original = {name: len(json.loads((run / ".lightly" / "predictions" / TASK /
                                      Path(name).with_suffix(".json")).read_text())[0]
                          ["boxes"]) for name in (a, b)}
    assert kept == {name: original[name] - 2 for name in (a, b)}


def test_malformed_metadata_and_an_empty_run_are_exit_2(run: Path, tmp_path: Path,
                                                        yolox_model: Path,
                                                        caplog: pytest.LogCaptureFixture):
    balance = _config(tmp_path, {"n_samples": 3, "strategies": [
        {"input": {"type": "METADATA", "key": "weather"}, "strategy": {"type": "BALANCE",
                                                                       "target": {"x": 1.0}}}]})
    metadata = tmp_path / "meta.json"
    metadata.write_text(json.dumps([{"weather": "rain"}]))  # a list, not an object
    assert _select(run, balance, 3, "--metadata", str(metadata)) == 2  # was AttributeError
    assert "must be a JSON object" in caplog.text
    metadata.write_text("{not json")
    assert _select(run, balance, 3, "--metadata", str(metadata)) == 2

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "bad.jpg").write_bytes(b"not an image")
    empty = tmp_path / "empty-run"
    assert main(["run", str(broken), "--output-dir", str(empty), "--model", str(yolox_model),
                 "--quiet"]) == 3
    caplog.clear()
    assert _select(empty, _config(tmp_path, DIVERSITY), 3) == 2
    assert "holds no predicted images" in caplog.text  # before: pass --embeddings image
    assert "--embeddings" not in caplog.text


def test_a_garbled_prediction_file_is_named(run: Path, tmp_path: Path,
                                            caplog: pytest.LogCaptureFixture):
    path = sorted((run / ".lightly" / "predictions" / TASK).glob("0*.json"))[0]
    path.write_text(json.dumps([{"filename": "x.jpg", "boxes": {"a": 1}, "labels": [],
                                 "scores": []}]))
    assert _select(run, _config(tmp_path, DIVERSITY), 3) == 2
    assert path.name in caplog.text and "must be lists" in caplog.text


def test_a_selection_killed_while_writing_crops_leaves_the_old_set(run: Path, images: Path,
                                                                   tmp_path: Path):
    """A real SIGKILL of `pretag select` in the middle of its crops."""
    objects = _config(tmp_path, OBJECTS)
    assert _select(run, objects, 5, "--images", str(images), "--write-crops") == 0
    before = {p.relative_to(run).as_posix(): p.read_bytes()
              for p in (run / "selection").rglob("*") if p.is_file()}
    proc = subprocess.Popen([sys.executable, "-m", "pretag.cli", "select", str(run),
                             "--config", str(objects), "--n-samples", "1000", "--images",
                             str(images), "--write-crops"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    staging = run / ".selection.new" / "crops"
    deadline = time.monotonic() + 120
    while len(list(staging.glob("*.png"))) < 3:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.005)
    proc.kill()
    proc.wait(30)
    after = {p.relative_to(run).as_posix(): p.read_bytes()
             for p in (run / "selection").rglob("*") if p.is_file()}
    assert after == before  # before the fix: a new selected.txt beside the old picks
    assert _select(run, objects, 7, "--images", str(images), "--write-crops") == 0
    assert len(list((run / "selection" / "crops").glob("*.png"))) == 7
    assert not (run / ".selection.new").exists()
