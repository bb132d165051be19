"""Shared fixtures. Data and the YOLOX model come from $PRETAG_SHARED (default ../shared).

A test that needs them fails when they are missing: it never skips.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

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


#: What a test server gets unless a test says otherwise.
SERVER_DEFAULTS = {"host": "127.0.0.1", "port": 0, "metrics_port": None}


@pytest.fixture(scope="module")
def start_server(yolox_model: Path) -> Iterator[Callable[..., Any]]:
    """Starts in-process servers (``BackgroundServer``) on free ports with the YOLOX
    contract model and :data:`SERVER_DEFAULTS`, settings overridden by keyword; stops them
    when the module is done. The one server factory of the suite."""
    from pretag.server.app import BackgroundServer
    from pretag.server.config import server_config

    started: list[Any] = []

    def start(**settings: Any) -> Any:
        server = BackgroundServer(server_config(**{"model": yolox_model, **SERVER_DEFAULTS,
                                                   **settings}))
        server.__enter__()
        started.append(server)
        return server

    yield start
    for server in reversed(started):
        server.__exit__(None, None, None)


class ServeProcess:
    """`pretag serve` in a subprocess, ready when its --ready-file appears; log collected."""

    _count = 0

    def __init__(self, *args: str, folder: Path) -> None:
        ServeProcess._count += 1
        self.ready_file = folder / f"ready-{os.getpid()}-{ServeProcess._count}.json"
        self.proc = subprocess.Popen([sys.executable, "-m", "pretag.cli", "serve", *args,
                                      "--ready-file", str(self.ready_file)],
                                     stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line)

    def wait_ready(self, timeout: float = 120) -> int:
        from pretag.server.app import wait_ready

        try:
            return int(wait_ready(self.ready_file, self.proc, timeout)["port"])
        except RuntimeError as exc:
            raise AssertionError(f"{exc}\n{''.join(self.lines)}") from None

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)  # a test may have frozen it
            self.proc.kill()
        self.proc.wait(30)


@pytest.fixture()
def serve_process(tmp_path_factory: pytest.TempPathFactory
                  ) -> Iterator[Callable[..., ServeProcess]]:
    """Starts `pretag serve` subprocesses; kills whatever is left of them afterwards."""
    started: list[ServeProcess] = []
    folder = tmp_path_factory.mktemp("serve")

    def start(*args: str) -> ServeProcess:
        started.append(ServeProcess(*args, folder=folder))
        return started[-1]

    yield start
    for process in started:
        process.kill()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[str]:
    """A real local Ray cluster (``ray start --head``, 2 CPUs) for the session; its
    address. Started on first use, stopped (``ray stop``) at the end."""
    ray = str(Path(sys.executable).with_name("ray"))
    port = free_port()
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    started = subprocess.run([ray, "start", "--head", f"--port={port}", "--num-cpus=2",
                              "--include-dashboard=false", "--disable-usage-stats"],
                             env=env, capture_output=True, text=True, timeout=180)
    if started.returncode != 0:
        pytest.fail(f"ray start failed:\n{started.stdout}\n{started.stderr}", pytrace=False)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        subprocess.run([ray, "stop", "--force"], env=env, capture_output=True, timeout=120)


@pytest.fixture()
def unused_port() -> int:
    """A local TCP port nothing listens on."""
    return free_port()


@pytest.fixture(scope="session")
def free_ports() -> Callable[[], int]:
    """:func:`free_port` for helpers that start several servers (the one place ports are
    found)."""
    return free_port
