"""``pretag serve``: flags over :class:`ServerConfig`, every one also settable in --config."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
from pathlib import Path

from pretag.server.backend import BackendError
from pretag.server.config import ConfigError, build_config, read_config_file
from pretag.token_file import TokenFileError, read_token_file

log = logging.getLogger("pretag")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags default to None so that only those given override the config file."""
    add = parser.add_argument
    add("--config", type=Path, help="TOML file with any of these settings (flag names as keys)")
    add("--model", type=Path, help="contract ONNX model to serve")
    add("--host", help="address to bind (default [::])")
    add("--port", type=int, help="gRPC port (default 50051; 0 picks a free one)")
    add("--providers", nargs="+", metavar="NAME",
        help="ONNX Runtime providers in order: tensorrt, cuda, cpu or full names "
             "(default: TensorRT, CUDA, CPU, whichever are installed)")
    add("--instances", type=int, help="model sessions running batches at once (default 1)")
    add("--threads", type=int, help="ONNX Runtime threads per instance (default cores/instances)")
    add("--max-batch-size", type=int, help="default 8")
    add("--max-queue-delay-ms", type=float, help="longest wait for a batch to fill (default 2)")
    add("--max-queue", type=int,
        help="images waiting before new ones get RESOURCE_EXHAUSTED (default 256)")
    add("--max-pixels", type=int, help="largest image accepted, in pixels (default 100M)")
    add("--decode-threads", type=int, help="image decoding threads (default: one per core)")
    add("--decode-memory-mb", type=int,
        help="memory for images being decoded at once; more wait their turn (default 1024; "
             "a single larger image is decoded alone)")
    add("--score-threshold", type=float, help="default threshold (default: the model's)")
    add("--no-warmup", dest="warmup", action="store_const", const=False,
        help="report SERVING without running every batch size first")
    add("--metrics-port", type=int, help="Prometheus /metrics port (default 8000; 0: free port)")
    add("--metrics-host", help="address the metrics endpoint binds (default: --host)")
    add("--no-metrics", action="store_true", help="no metrics endpoint")
    add("--grace-s", type=float, help="time to finish accepted work on SIGTERM (default 30)")
    add("--max-message-mb", type=int, help="largest gRPC message sent or received (default 64)")
    add("--tls-cert", type=Path, help="PEM certificate chain; enables TLS")
    add("--tls-key", type=Path, help="PEM private key for --tls-cert")
    add("--tls-client-ca", type=Path, help="PEM CA bundle; clients must present a cert (mTLS)")
    add("--token-file", type=Path, help="file holding a bearer token every call must carry")


def run(args: argparse.Namespace) -> int:
    from pretag.server.app import serve

    flags = {k: v for k, v in vars(args).items()
             if k not in ("command", "verbose", "config", "no_metrics")}
    try:
        file_values = read_config_file(args.config) if args.config else {}
        config = build_config(file_values, flags)
        if args.no_metrics:
            config = dataclasses.replace(config, metrics_port=None)
        if config.token_file is not None:
            read_token_file(config.token_file)  # refuse an empty one before binding
    except (ConfigError, TokenFileError) as exc:
        log.error("%s", exc)
        return 2
    try:
        asyncio.run(serve(config))
    except (BackendError, OSError) as exc:
        log.error("%s", exc)
        return 1
    return 0
