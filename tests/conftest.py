"""Shared fixtures. Data and the YOLOX model come from $PRETAG_SHARED (default ../shared).

A test that needs them fails when they are missing: it never skips.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def shared_dir() -> Path:
    path = Path(os.environ.get("PRETAG_SHARED", ROOT.parent / "shared")).resolve()
    if not (path / "models" / "yolox_nano.onnx").is_file():
        pytest.fail(f"shared data not found at {path}: set PRETAG_SHARED to the folder holding "
                    f"models/yolox_nano.onnx and data/", pytrace=False)
    return path


@pytest.fixture(scope="session")
def shared() -> Path:
    return shared_dir()


@pytest.fixture(scope="session")
def yolox_original(shared: Path) -> Path:
    return shared / "models" / "yolox_nano.onnx"


@pytest.fixture(scope="session")
def coco128(shared: Path) -> Path:
    return shared / "data" / "coco128"


@pytest.fixture(scope="session")
def yolox_model(tmp_path_factory: pytest.TempPathFactory, yolox_original: Path) -> Path:
    """The YOLOX-Nano contract model (driving classes, default settings)."""
    from pretag.export.yolox import YoloxExport, export_yolox

    out = tmp_path_factory.mktemp("models") / "yolox_driving.onnx"
    export_yolox(YoloxExport(onnx=yolox_original, output=out))
    return out
