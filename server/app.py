"""The gRPC server: services, health, reflection, auth, TLS, metrics, graceful drain.

Lifecycle: bind -> NOT_SERVING while warming up -> SERVING -> on SIGTERM/SIGINT:
NOT_SERVING, refuse new images (UNAVAILABLE), finish every accepted one, stop
the server within ``grace_s``, exit 0.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from pretag.kserve_v2 import grpc_service_pb2 as kpb
from pretag.kserve_v2 import grpc_service_pb2_grpc as kpb_grpc
from pretag.runtime.backend import Backend, OrtBackend
from pretag.server.auth import TokenAuth
from pretag.server.config import ServerConfig
from pretag.server.engine import Engine
from pretag.server.kserve import KServeService
from pretag.server.metrics import Metrics
from pretag.server.rpc import MessageGuard
from pretag.server.service import PretaggerService
from pretag.token_file import read_token_file
from pretag.v1 import pretag_pb2 as pb
from pretag.v1 import pretag_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

SERVICES = (pb.DESCRIPTOR.services_by_name["Pretagger"].full_name,
            kpb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name)


def _credentials(config: ServerConfig) -> grpc.ServerCredentials | None:
    if config.tls_cert is None or config.tls_key is None:
        return None
    client_ca = config.tls_client_ca.read_bytes() if config.tls_client_ca else None
    return grpc.ssl_server_credentials(
        [(config.tls_key.read_bytes(), config.tls_cert.read_bytes())],
        root_certificates=client_ca, require_client_auth=client_ca is not None)


class PretagServer:
    """One server process's worth of gRPC server, engine and metrics."""

    def __init__(self, config: ServerConfig, backend: Backend | None = None) -> None:
        self.config = config
        self.backend = backend or OrtBackend(config.model, config.backend,
                                             instances=config.batching.instances)
        self.metrics = Metrics()
        self.engine = Engine(self.backend, config.engine, self.metrics)
        self.metrics.bind_pending(lambda: self.engine.pending)
        self.health = health_aio.HealthServicer()
        self.port = 0
        self.metrics_port: int | None = None
        self._server: grpc.aio.Server | None = None
        self._stopped = asyncio.Event()

    def _build(self) -> grpc.aio.Server:
        limit = self.config.max_message_bytes
        interceptors: list[grpc.aio.ServerInterceptor] = []
        if self.config.token_file is not None:
            interceptors.append(TokenAuth(read_token_file(self.config.token_file),
                                          self.metrics))
        interceptors.append(MessageGuard(self.metrics))
        server = grpc.aio.server(interceptors=interceptors, options=[
            ("grpc.max_send_message_length", limit),
            ("grpc.max_receive_message_length", limit),
        ])
        pb_grpc.add_PretaggerServicer_to_server(PretaggerService(self.engine, limit), server)
        kpb_grpc.add_GRPCInferenceServiceServicer_to_server(KServeService(self.engine), server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        names = (*SERVICES, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                 reflection.SERVICE_NAME)
        reflection.enable_server_reflection(names, server)
        return server

    async def _set_health(self, status: health_pb2.HealthCheckResponse.ServingStatus) -> None:
        for name in ("", *SERVICES):  # the server as a whole and each service
            await self.health.set(name, status)

    async def start(self) -> int:
        """Bind, warm up, report SERVING; returns the bound port."""
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        self._server = self._build()
        address = f"{self.config.host}:{self.config.port}"
        creds = _credentials(self.config)
        self.port = (self._server.add_secure_port(address, creds) if creds
                     else self._server.add_insecure_port(address))
        if self.port == 0:
            raise OSError(f"cannot bind {address}")
        await self._server.start()
        if self.config.metrics_port is not None:
            self.metrics_port = self.metrics.serve_http(self.config.metrics_port,
                                                        self.config.metrics_address())
        await self.engine.start()
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        log.info("serving %s on port %d (%s, providers %s)%s", self.engine.spec.name, self.port,
                 "TLS" if creds else "plaintext", ", ".join(self.backend.providers),
                 f", metrics on port {self.metrics_port}" if self.metrics_port else "")
        return self.port

    async def stop(self, grace_s: float | None = None) -> None:
        """Drain: NOT_SERVING, refuse new images, finish accepted ones, stop."""
        grace = self.config.grace_s if grace_s is None else grace_s
        start = time.monotonic()
        log.info("draining (grace %.1f s)", grace)
        await self.health.enter_graceful_shutdown()
        try:
            await asyncio.wait_for(self.engine.close(), grace)
        except TimeoutError:
            log.warning("accepted work did not finish within %.1f s", grace)
        if self._server is not None:
            await self._server.stop(max(0.0, grace - (time.monotonic() - start)))
        self.metrics.stop_http()
        self._stopped.set()
        log.info("stopped after %.1f s", time.monotonic() - start)

    async def wait(self) -> None:
        await self._stopped.wait()


def write_ready_file(path: Path, server: PretagServer) -> None:
    """{"port", "metrics_port", "pid"} as JSON, renamed into place: whole or absent."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps({"port": server.port, "metrics_port": server.metrics_port,
                               "pid": os.getpid()}) + "\n")
    os.replace(tmp, path)


def wait_ready(path: Path, proc: subprocess.Popen[Any], timeout_s: float = 120
               ) -> dict[str, Any]:
    """What a `pretag serve --ready-file PATH` subprocess wrote once SERVING.

    Raises RuntimeError if the process exits first or the time runs out.
    """
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if path.is_file():
            return dict(json.loads(path.read_text()))
        if proc.poll() is not None:
            raise RuntimeError(f"pretag serve exited with {proc.returncode} before serving")
        time.sleep(0.02)
    raise RuntimeError(f"pretag serve was not serving after {timeout_s:g} s")


async def serve(config: ServerConfig, backend: Backend | None = None,
                ready_file: Path | None = None) -> None:
    """Run until SIGTERM or SIGINT, then drain and return.

    ``ready_file`` is written once the server is SERVING and removed when it stops.
    """
    server = PretagServer(config, backend)
    await server.start()
    if ready_file is not None:
        write_ready_file(ready_file, server)
    loop = asyncio.get_running_loop()
    tasks: list[asyncio.Task[None]] = []

    def on_signal(sig: signal.Signals) -> None:
        log.info("received %s", sig.name)
        if not tasks:  # a second signal while draining does not restart the drain
            tasks.append(loop.create_task(server.stop()))

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    try:
        await server.wait()
    finally:
        if ready_file is not None:
            ready_file.unlink(missing_ok=True)


class BackgroundServer:
    """A :class:`PretagServer` on its own event loop in a daemon thread.

    Used by :mod:`pretag.local` (``pretag run`` without ``--server``) and by tests;
    ``with`` starts it (after warm-up) and drains it on exit.
    """

    def __init__(self, config: ServerConfig, backend: Backend | None = None) -> None:
        self.config = config
        self._backend = backend
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self.server: PretagServer | None = None
        self._thread = threading.Thread(target=self._main, name="pretag-server", daemon=True)

    def _main(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self._serve())
        except BaseException as exc:  # reported to the starting thread
            self._error = exc
            self._ready.set()
        finally:
            self._loop.close()

    async def _serve(self) -> None:
        self.server = PretagServer(self.config, self._backend)
        await self.server.start()
        self._ready.set()
        await self.server.wait()

    @property
    def port(self) -> int:
        if self.server is None:
            raise RuntimeError("server not started")
        return self.server.port

    @property
    def metrics_port(self) -> int | None:
        return None if self.server is None else self.server.metrics_port

    def start(self, timeout: float = 600) -> int:
        self._thread.start()
        if not self._ready.wait(timeout):
            raise TimeoutError(f"server did not become ready within {timeout} s")
        if self._error is not None:
            raise self._error
        return self.port

    def stop(self, grace_s: float | None = None) -> None:
        if self.server is not None and self._thread.is_alive():
            future = asyncio.run_coroutine_threadsafe(self.server.stop(grace_s), self._loop)
            future.result()
        self._thread.join()

    def __enter__(self) -> BackgroundServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
