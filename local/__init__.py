"""What ``pretag run`` needs when no ``--server`` is given, composed from the layers:
the default model (found in the cache, or exported once) and a server on a free local port.

The client itself only ever talks to addresses; this module is where it meets the
server and export code.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pretag.job.run import RunConfig, RunSummary, run_job
from pretag.job.stream import RunError

log = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "fasterrcnn_resnet50_fpn-driving.onnx"


def cache_dir() -> Path:
    return Path(os.environ.get("PRETAG_CACHE", Path.home() / ".cache" / "pretag"))


def default_model() -> Path:
    """The Faster R-CNN contract model, exported into the cache on first use."""
    path = cache_dir() / DEFAULT_MODEL_NAME
    if path.is_file():
        return path
    try:
        from pretag.export.common import ExportError
        from pretag.export.fasterrcnn import FasterRCNNExport, export_fasterrcnn
    except ImportError:
        raise RunError(f"no --model given and the default model ({path}) does not exist; "
                       f"exporting it needs the export extra: pip install 'pretag[export]', "
                       f"or pass --model FILE.onnx") from None
    log.info("exporting the default model to %s (once)", path)
    try:
        export_fasterrcnn(FasterRCNNExport(output=path, weights="default"))
    except ExportError as exc:
        log.debug("default model export failed: %s", exc)
        raise RunError(f"no --model given, and the default model ({path}) cannot be made: "
                       f"torchvision's COCO weights are not in torch's cache and cannot be "
                       f"downloaded. Pass --model FILE.onnx (for example from `pretag export "
                       f"yolox`), or export it from a local weights file: pretag export "
                       f"fasterrcnn --weights FILE.pth --output {path}") from None
    return path


@contextmanager
def local_server(model: Path | None, *, window: int, max_batch_size: int | None = None,
                 settings: Mapping[str, Any] | None = None) -> Iterator[str]:
    """A server for ``model`` (None: the default model) on a free local port; its address.

    Its queue holds four windows (at least the server default), so one client's window
    is never refused; ``max_batch_size`` None keeps the server default. ``settings``:
    more server settings named as the flags (e.g. ``instances``, ``threads``).
    """
    from pretag.server.app import BackgroundServer
    from pretag.server.config import BatchingConfig, server_config

    path = model if model is not None else default_model()
    if not path.is_file():
        raise RunError(f"model file {path} does not exist")
    batching = {} if max_batch_size is None else {"max_batch_size": max_batch_size}
    server = BackgroundServer(server_config(
        model=path, host="127.0.0.1", port=0, metrics_port=None,
        max_queue=max(BatchingConfig().max_queue, 4 * window), **batching,
        **(settings or {})))
    address = f"127.0.0.1:{server.start()}"
    try:
        yield address
    finally:
        server.stop(grace_s=5)


def run_locally(config: RunConfig, model: Path | None, *, max_batch_size: int | None = None,
                on_result: Callable[[str, bool], None] | None = None,
                server_settings: Mapping[str, Any] | None = None) -> RunSummary:
    """:func:`run_job` against a local server for ``model``."""
    with local_server(model, window=config.stream.window, max_batch_size=max_batch_size,
                      settings=server_settings) as address:
        return run_job(config.with_servers((address,)), on_result=on_result)
