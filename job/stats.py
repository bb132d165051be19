"""Per-class statistics and their bar chart: one module for the run's report
(:class:`Histogram`, over prediction entries as they are written) and the selection's
(:func:`class_stats`, over a samples x classes count matrix)."""

from __future__ import annotations

import io
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class Histogram:
    """Objects per class and images containing each class, over prediction entries."""

    class_names: Sequence[str]
    objects: Counter[str] = field(default_factory=Counter)
    images_with: Counter[str] = field(default_factory=Counter)
    images: int = 0
    empty_images: int = 0

    def add(self, entry: dict[str, Any]) -> None:
        labels = entry["labels"]
        self.images += 1
        self.objects.update(labels)
        self.images_with.update(set(labels))
        if not labels:
            self.empty_images += 1

    def to_json(self) -> dict[str, Any]:
        total = sum(self.objects.values())
        return {
            "images": self.images,
            "objects": total,
            "objects_per_class": {n: self.objects.get(n, 0) for n in self.class_names},
            "images_per_class": {n: self.images_with.get(n, 0) for n in self.class_names},
            "average_objects_per_image": total / self.images if self.images else 0.0,
            "images_without_detections": self.empty_images,
        }


def class_stats(classes: Sequence[str], counts: np.ndarray) -> dict[str, Any]:
    """Objects and samples per class, objects per sample and the class distribution of
    ``counts`` [samples, classes]."""
    objects = counts.sum(axis=0)
    total = float(objects.sum())
    rows = len(counts)
    return {"samples": rows, "objects": int(total),
            "objects_per_class": dict(zip(classes, map(int, objects), strict=True)),
            "samples_per_class": dict(zip(classes, map(int, (counts > 0).sum(axis=0)),
                                          strict=True)),
            "average_objects_per_sample": total / rows if rows else 0.0,
            "class_distribution": dict(zip(classes,
                                           (objects / total if total else objects).tolist(),
                                           strict=True))}


def bar_chart(names: Sequence[str], values: Sequence[int], title: str, *,
              size: tuple[float, float] = (6.4, 3.6), dpi: int = 100, fontsize: int = 8,
              rotation: int = 30, ylabel: str = "objects") -> bytes:
    """A PNG bar chart of ``values`` per name, each bar labelled with its value."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=size, layout="constrained")
    bars = ax.bar(list(names), list(values), color="#3b7dd8")
    ax.bar_label(bars, labels=[str(v) for v in values], fontsize=fontsize)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.tick_params(axis="x", rotation=rotation)
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=dpi)
    plt.close(fig)
    return png.getvalue()
