"""Hand-off to labelling tools, with pretag's boxes as pre-annotations (image level):

* ``yolo``: Ultralytics' layout, the common next step for training: ``data.yaml`` (names),
  ``images/train/`` (the picked images; a video frame written out as PNG) and
  ``labels/train/<stem>.txt`` (``class cx cy w h``, normalised). A name's folders become
  ``__`` (``a/b.jpg`` -> ``a__b.jpg``), as YOLO tools look for labels beside images.
* ``cvat``: CVAT for images 1.1 XML (``annotations.xml``) with the images beside it
  (``images/<name>``), as CVAT exports a task with its images and imports it; boxes in
  pixels with their score as an attribute. Chosen over
  COCO 1.0 (the ``coco`` export, which CVAT imports too) because it carries the image sizes
  and labels the way CVAT's own exports do and needs no category ids.
* ``label-studio``: ``tasks.json`` (one task per image, ``data.image`` the URL prefix plus
  its name; pretag's boxes as ``predictions``: rectanglelabels in percent of the original
  width and height, a score per box, the task's score the mean of them for sorting,
  ``model_version`` the model's name and the first 12 hex of its weights' sha256) and
  ``labeling_config.xml`` with the run's classes.

The images' sizes are read as for the other exports (video frames: out of the video).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from xml.etree import ElementTree as ET

import cv2

from pretag.job.outputs import read_settings, write_atomic
from pretag.job.video import SampleImages
from pretag.selection.export import sized
from pretag.selection.predictions import RunPredictions

#: Label Studio's local-files URL: serve the run's input folder as its document root.
LOCAL_FILES = "/data/local-files/?d="


def flat_name(name: str) -> str:
    return name.replace("/", "__")


def _copy_image(samples: SampleImages, name: str, target: Path) -> None:
    """The sample's file copied, or a video frame written out as PNG."""
    target.parent.mkdir(parents=True, exist_ok=True)
    if (samples.root / name).is_file():
        shutil.copyfile(samples.root / name, target)
    elif not cv2.imwrite(str(target), samples.read_bgr(name)):
        raise OSError(f"cannot write {target}")


def export_yolo(run: RunPredictions, images: Path, names: list[str], root: Path) -> None:
    classes = run.classes
    samples = SampleImages(images)
    (root / "labels" / "train").mkdir(parents=True, exist_ok=True)
    for name, entry, _, _ in sized(run, images, names):
        _copy_image(samples, name, root / "images" / "train" / flat_name(name))
        lines = [f"{classes.index(label)} {(x1 + x2) / 2:.6f} {(y1 + y2) / 2:.6f} "
                 f"{x2 - x1:.6f} {y2 - y1:.6f}\n"
                 for (x1, y1, x2, y2), label in zip(entry["boxes"], entry["labels"],
                                                    strict=True)]
        label_file = (root / "labels" / "train" / flat_name(name)).with_suffix(".txt")
        write_atomic(label_file, "".join(lines))
    data = ("path: .\ntrain: images/train\nval: images/train\nnames:\n"
            + "".join(f"  {i}: {c}\n" for i, c in enumerate(classes)))
    write_atomic(root / "data.yaml", data)


def export_cvat(run: RunPredictions, images: Path, names: list[str], root: Path) -> None:
    """``root/annotations.xml`` and ``root/images/<name>``, as CVAT exports a task with its
    images (what CVAT and datumaro import)."""
    samples = SampleImages(images)
    annotations = ET.Element("annotations")
    ET.SubElement(annotations, "version").text = "1.1"
    meta = ET.SubElement(ET.SubElement(annotations, "meta"), "task")
    ET.SubElement(meta, "size").text = str(len(names))
    labels = ET.SubElement(meta, "labels")
    for c in run.classes:
        label = ET.SubElement(labels, "label")
        ET.SubElement(label, "name").text = c
        attributes = ET.SubElement(ET.SubElement(label, "attributes"), "attribute")
        for key, value in (("name", "score"), ("mutable", "False"), ("input_type", "number"),
                           ("default_value", "0"), ("values", "0;1;0.001")):
            ET.SubElement(attributes, key).text = value
    for image_id, (name, entry, w, h) in enumerate(sized(run, images, names)):
        _copy_image(samples, name, root / "images" / name)
        image = ET.SubElement(annotations, "image", id=str(image_id), name=name,
                              width=str(w), height=str(h))
        for (x1, y1, x2, y2), label, score in zip(entry["boxes"], entry["labels"],
                                                  entry["scores"], strict=True):
            box = ET.SubElement(image, "box", label=label, source="auto", occluded="0",
                                xtl=f"{x1 * w:.2f}", ytl=f"{y1 * h:.2f}",
                                xbr=f"{x2 * w:.2f}", ybr=f"{y2 * h:.2f}", z_order="0")
            ET.SubElement(box, "attribute", name="score").text = f"{score:.4f}"
    ET.indent(annotations)
    write_atomic(root / "annotations.xml", '<?xml version="1.0" encoding="utf-8"?>\n'
                 + ET.tostring(annotations, encoding="unicode") + "\n")


def labeling_config(classes: list[str]) -> str:
    labels = "".join(f'    <Label value="{c}"/>\n' for c in classes)
    return ('<View>\n  <Image name="image" value="$image"/>\n'
            '  <RectangleLabels name="label" toName="image">\n'
            f"{labels}  </RectangleLabels>\n</View>\n")


def export_label_studio(run: RunPredictions, images: Path, names: list[str], root: Path,
                        run_dir: Path, url_prefix: str = LOCAL_FILES) -> None:
    settings = read_settings(run_dir) or {}
    version = f"{settings.get('model', 'pretag')}@{str(settings.get('source_sha256'))[:12]}"
    tasks = []
    for name, entry, w, h in sized(run, images, names):
        result = [{"id": f"{i}", "from_name": "label", "to_name": "image",
                   "type": "rectanglelabels", "original_width": w, "original_height": h,
                   "image_rotation": 0, "score": score,
                   "value": {"x": x1 * 100, "y": y1 * 100, "width": (x2 - x1) * 100,
                             "height": (y2 - y1) * 100, "rotation": 0,
                             "rectanglelabels": [label]}}
                  for i, ((x1, y1, x2, y2), label, score) in enumerate(zip(
                      entry["boxes"], entry["labels"], entry["scores"], strict=True))]
        score = sum(entry["scores"]) / len(entry["scores"]) if entry["scores"] else 0.0
        tasks.append({"data": {"image": url_prefix + name, "filename": name},
                      "predictions": [{"model_version": version, "score": score,
                                       "result": result}]})
    root.mkdir(parents=True, exist_ok=True)
    write_atomic(root / "tasks.json", json.dumps(tasks, indent=1) + "\n")
    write_atomic(root / "labeling_config.xml", labeling_config(list(run.classes)))
