"""Loading torchvision Faster R-CNN weights: torchvision's COCO release, random, or a file."""

from __future__ import annotations

import hashlib
import logging
import socket
import urllib.error
from dataclasses import dataclass
from pathlib import Path

import torch
from torchvision.models.detection import (
    FasterRCNN,
    FasterRCNN_ResNet50_FPN_Weights,
    fasterrcnn_resnet50_fpn,
)

from pretag.export.common import ExportError, sha256_file

log = logging.getLogger(__name__)

COCO_WEIGHTS = FasterRCNN_ResNet50_FPN_Weights.COCO_V1
#: torchvision's 91 COCO label names, index 0 is background, some are "N/A".
COCO_CATEGORIES: list[str] = list(COCO_WEIGHTS.meta["categories"])
DOWNLOAD_TIMEOUT_S = 30


@dataclass(frozen=True)
class LoadedWeights:
    model: FasterRCNN
    source: str
    sha256: str


def _state_dict_sha256(state: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for key in sorted(state):
        digest.update(key.encode())
        digest.update(state[key].detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _build(**kwargs: object) -> FasterRCNN:
    return fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=91,
                                   **kwargs).eval()


def _load_default(**kwargs: object) -> LoadedWeights:
    url = COCO_WEIGHTS.url
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(url).name
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    try:
        state = torch.hub.load_state_dict_from_url(url, progress=False, check_hash=True,
                                                   map_location="cpu")
    except (urllib.error.URLError, OSError, TimeoutError) as exc:
        raise ExportError(
            f"cannot get torchvision's COCO weights ({url}): {exc}. Not in the cache "
            f"({cached}) and the download failed; offline, pass --weights PATH with a local "
            f"fasterrcnn_resnet50_fpn state_dict (.pth)."
        ) from None
    except RuntimeError as exc:  # hash mismatch or unreadable partial download
        raise ExportError(f"torchvision's COCO weights at {cached} are damaged ({exc}); "
                          f"delete the file or pass --weights PATH.") from None
    finally:
        socket.setdefaulttimeout(previous)
    model = _build(**kwargs)
    model.load_state_dict(state)
    return LoadedWeights(model, f"torchvision:{COCO_WEIGHTS}", sha256_file(cached))


def _load_file(path: Path, **kwargs: object) -> LoadedWeights:
    if not path.is_file():
        raise ExportError(f"weights file {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for corrupt files
        raise ExportError(f"cannot read weights file {path}: not a PyTorch checkpoint "
                          f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]})") from None
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict):
        raise ExportError(f"weights file {path} does not hold a state_dict")
    model = _build(**kwargs)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise ExportError(f"weights file {path} does not fit fasterrcnn_resnet50_fpn with 91 "
                          f"COCO classes: {str(exc).splitlines()[0][:300]}") from None
    return LoadedWeights(model, f"file:{path.name}", sha256_file(path))


def load_fasterrcnn(weights: str, seed: int = 0, **kwargs: object) -> LoadedWeights:
    """``weights``: ``default`` (torchvision COCO_V1), ``random`` (seeded) or a file path.

    ``kwargs`` go to torchvision's constructor (e.g. ``rpn_post_nms_top_n_test``).
    """
    if weights == "default":
        return _load_default(**kwargs)
    if weights == "random":
        torch.manual_seed(seed)
        model = _build(**kwargs)
        return LoadedWeights(model, f"random:seed={seed}", _state_dict_sha256(model.state_dict()))
    return _load_file(Path(weights), **kwargs)
