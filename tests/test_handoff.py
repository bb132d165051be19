"""Hand-off to labelling tools (issue 27), read back by the tools' own libraries: datumaro
(CVAT's dataset library) for the YOLO and CVAT exports, label-studio-sdk's converter for
the Label Studio tasks. Boxes must equal pretag's within 0.5 px."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from pretag.cli import main
from pretag.job.outputs import prediction_path

pytestmark = pytest.mark.slow  # see the README: pytest -m "not slow"

DIVERSE = {"n_samples": 8, "strategies": [{"input": {"type": "EMBEDDINGS"},
                                           "strategy": {"type": "DIVERSITY"}}]}


@pytest.fixture(scope="module")
def picked(tmp_path_factory: pytest.TempPathFactory, coco128: Path, yolox_model: Path
           ) -> tuple[Path, Path, list[str]]:
    """A run over 40 coco128 images in a nested folder, 8 picks exported in every format."""
    root = tmp_path_factory.mktemp("handoff")
    folder = root / "in"
    for i, path in enumerate(sorted((coco128 / "images").rglob("*.jpg"))[:40]):
        target = folder / ("day" if i % 2 else "night") / path.name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.symlink_to(path)
    run = root / "run"
    assert main(["run", str(folder), "--output-dir", str(run), "--model", str(yolox_model),
                 "--score-threshold", "0.3", "--embeddings", "all", "--quiet"]) == 0
    config = root / "diverse.json"
    config.write_text(json.dumps(DIVERSE))
    assert main(["select", str(run), "--config", str(config), "--images", str(folder),
                 "--export", "yolo", "--export", "cvat", "--export", "label-studio",
                 "--url-prefix", "https://bucket.example/in/"]) == 0
    names = (run / "selection" / "selected.txt").read_text().split()
    return run, folder, names


def _key(pair: tuple[str, np.ndarray]) -> tuple[str, tuple[float, ...]]:
    return pair[0], tuple(np.round(pair[1], 1))


def _pixel_boxes(run: Path, folder: Path, name: str) -> list[tuple[str, np.ndarray]]:
    entry = json.loads(prediction_path(run, name).read_text())[0]
    height, width = cv2.imread(str(folder / name)).shape[:2]
    scale = np.array([width, height, width, height])
    return sorted(((label, np.array(box) * scale)
                   for box, label in zip(entry["boxes"], entry["labels"], strict=True)),
                  key=_key)


def _same(got: list[tuple[str, np.ndarray]], want: list[tuple[str, np.ndarray]]) -> None:
    assert [g[0] for g in got] == [w[0] for w in want]
    for (_, a), (_, b) in zip(got, want, strict=True):
        assert np.abs(a - b).max() <= 0.5


def _datumaro_boxes(item: Any, names: list[str]) -> list[tuple[str, np.ndarray]]:
    return sorted(((names[a.label], np.array([a.x, a.y, a.x + a.w, a.y + a.h]))
                   for a in item.annotations if a.type.name == "bbox"), key=_key)


def test_yolo_export_reads_back_through_datumaro(picked: tuple[Path, Path, list[str]]):
    import datumaro as dm

    run, folder, names = picked
    dataset = dm.Dataset.import_from(str(run / "selection" / "yolo"), "yolo")
    labels = [c.name for c in dataset.categories()[dm.AnnotationType.label]]
    assert labels == ["bicycle", "bus", "car", "motorcycle", "person", "train", "truck"]
    items = {item.id: item for item in dataset}
    assert sorted(items) == sorted(Path(n.replace("/", "__")).stem for n in names)
    assert sum(len(_pixel_boxes(run, folder, n)) for n in names) > 0
    for name in names:
        _same(_datumaro_boxes(items[Path(name.replace("/", "__")).stem], labels),
              _pixel_boxes(run, folder, name))


def test_cvat_export_reads_back_through_datumaro(picked: tuple[Path, Path, list[str]]):
    import datumaro as dm

    run, folder, names = picked
    dataset = dm.Dataset.import_from(str(run / "selection" / "cvat"), "cvat")
    labels = [c.name for c in dataset.categories()[dm.AnnotationType.label]]
    items = {item.id: item for item in dataset}
    assert sorted(items) == sorted(str(Path(n).with_suffix("")) for n in names)
    for name in names:
        _same(_datumaro_boxes(items[str(Path(name).with_suffix(""))], labels),
              _pixel_boxes(run, folder, name))


def test_label_studio_tasks_convert_to_coco_with_its_own_converter(
        picked: tuple[Path, Path, list[str]], tmp_path: Path):
    from label_studio_sdk.converter import Converter

    run, folder, names = picked
    out = run / "selection" / "label_studio"
    tasks = json.loads((out / "tasks.json").read_text())
    assert [t["data"]["image"] for t in tasks] == [f"https://bucket.example/in/{n}"
                                                   for n in names]
    assert all(t["predictions"][0]["model_version"].startswith("yolox_nano-driving@")
               for t in tasks)
    # a reviewer accepting every pre-annotation: predictions become annotations, as
    # Label Studio exports them
    accepted = [{**t, "id": i + 1, "annotations": [{"id": i + 1, "result":
                                                     t["predictions"][0]["result"]}]}
                for i, t in enumerate(tasks)]
    (tmp_path / "export.json").write_text(json.dumps(accepted))
    converter = Converter(config=str(out / "labeling_config.xml"), project_dir=str(tmp_path))
    converter.convert_to_coco(str(tmp_path / "export.json"), str(tmp_path / "coco"),
                              is_dir=False)
    coco = json.loads((tmp_path / "coco" / "result.json").read_text())
    categories = {c["id"]: c["name"] for c in coco["categories"]}
    by_image: dict[int, list[tuple[str, np.ndarray]]] = {}
    for a in coco["annotations"]:
        x, y, w, h = a["bbox"]
        by_image.setdefault(a["image_id"], []).append(
            (categories[a["category_id"]], np.array([x, y, x + w, y + h])))
    for image in coco["images"]:
        name = next(n for n in names if image["file_name"].endswith(Path(n).name))
        _same(sorted(by_image.get(image["id"], []), key=_key), _pixel_boxes(run, folder, name))
    assert len(coco["images"]) == len(names)


def test_object_level_picks_export_as_their_images_with_the_picked_boxes_only(
        picked: tuple[Path, Path, list[str]], tmp_path: Path):
    import datumaro as dm

    from pretag.selection.export import crop_source

    run, folder, _ = picked
    config = tmp_path / "objects.json"
    config.write_text(json.dumps({
        "worker_config": {"object_level": {"task_name": "lightly_pretagging"}},
        "selection_config": {"n_samples": 6, "strategies": [
            {"input": {"type": "EMBEDDINGS"}, "strategy": {"type": "DIVERSITY"}}]}}))
    out = tmp_path / "out"
    assert main(["select", str(run), "--config", str(config), "--output-dir", str(out),
                 "--images", str(folder), "--export", "coco", "--export", "cvat",
                 "--export", "yolo", "--export", "label-studio"]) == 0
    crops = (out / "selection" / "selected.txt").read_text().split()
    want: dict[str, list[tuple[str, np.ndarray]]] = {}
    for crop in crops:
        name, index = crop_source(crop)
        boxes = dict(enumerate(_pixel_boxes_unsorted(run, folder, name)))
        want.setdefault(name, []).append(boxes[index])
    coco = json.loads((out / "selection" / "coco.json").read_text())
    assert sorted(i["file_name"] for i in coco["images"]) == sorted(want)
    assert len(coco["annotations"]) == len(set(crops))
    dataset = dm.Dataset.import_from(str(out / "selection" / "cvat"), "cvat")
    labels = [c.name for c in dataset.categories()[dm.AnnotationType.label]]
    for item in dataset:
        _same(_datumaro_boxes(item, labels), sorted(want[item.id + ".jpg"], key=_key))


def _pixel_boxes_unsorted(run: Path, folder: Path, name: str) -> list[tuple[str, np.ndarray]]:
    entry = json.loads(prediction_path(run, name).read_text())[0]
    height, width = cv2.imread(str(folder / name)).shape[:2]
    scale = np.array([width, height, width, height])
    return [(label, np.array(box) * scale)
            for box, label in zip(entry["boxes"], entry["labels"], strict=True)]
