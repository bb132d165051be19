"""``pretag serve``: flags over :class:`ServerConfig`, every one also settable in --config.

Defaults shown in the help are read from the config dataclasses, where they are set.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
from pathlib import Path

from pretag.runtime.backend import BackendError
from pretag.server.config import (
    KNOWN,
    BatchingConfig,
    ConfigError,
    EngineConfig,
    ServerConfig,
    build_config,
    read_config_file,
)
from pretag.token_file import TokenFileError, read_token_file

log = logging.getLogger("pretag")

_B, _E = BatchingConfig(), EngineConfig()
_S = ServerConfig.__dataclass_fields__


def _instances(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: a whole number or auto") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags default to None so that only those given override the config file."""
    add = parser.add_argument
    add("--config", type=Path, help="TOML file with any of these settings (flag names as keys)")
    add("--model", type=Path, help="contract ONNX model to serve")
    add("--host", help=f"address to bind (default {_S['host'].default})")
    add("--port", type=int, help=f"gRPC port (default {_S['port'].default}; 0 picks a free one)")
    add("--providers", nargs="+", metavar="NAME",
        help="ONNX Runtime providers in order: tensorrt, cuda, cpu or full names "
             "(default: TensorRT, CUDA, CPU, whichever are installed)")
    add("--instances", type=_instances,
        help="model sessions running batches at once, or auto (the default): from the "
             "cores and the model, e.g. one single-thread session per core for a small "
             "CPU model (README)")
    add("--threads", type=int, help="ONNX Runtime threads per instance (default cores/instances)")
    add("--provider-option", dest="provider_options", action="append", metavar="P:KEY=VALUE",
        help="an ONNX Runtime provider option, e.g. tensorrt:trt_engine_cache_enable=True "
             "(repeatable; in --config: a [provider_options.tensorrt] table)")
    add("--max-batch-size", type=int, help=f"default {_B.max_batch_size}")
    add("--max-queue-delay-ms", type=float,
        help=f"longest wait for a batch to fill (default {_B.max_queue_delay_ms:g})")
    add("--max-queue", type=int, help=f"images waiting before new ones get RESOURCE_EXHAUSTED "
                                      f"(default {_B.max_queue})")
    add("--max-pixels", type=int,
        help=f"largest image accepted, in pixels (default {_E.max_pixels:,})")
    add("--decode-threads", type=int, help="image decoding threads (default: one per core)")
    add("--decode-memory-mb", type=int,
        help=f"memory for images being decoded at once; more wait their turn (default "
             f"{_E.decode_memory_mb}; a single larger image is decoded alone)")
    add("--score-threshold", type=float, help="default threshold (default: the model's)")
    add("--full-decode", dest="full_decode", action="store_const", const=True,
        help="decode JPEGs at full size before resizing (default: at 1/2, 1/4 or 1/8 where "
             "the canvas allows; 2-3x faster on large frames, boxes within ~2 px)")
    add("--no-warmup", dest="warmup", action="store_const", const=False,
        help="report SERVING without running every batch size first")
    add("--metrics-port", type=int, help=f"Prometheus /metrics port (default "
                                         f"{_S['metrics_port'].default}; 0: a free port)")
    add("--metrics-host", help="address the metrics endpoint binds (default: --host)")
    add("--no-metrics", dest="metrics", action="store_const", const=False,
        help="no metrics endpoint")
    add("--grace-s", type=float,
        help=f"time to finish accepted work on SIGTERM (default {_S['grace_s'].default:g})")
    add("--max-message-mb", type=int, help=f"largest gRPC message sent or received (default "
                                           f"{_S['max_message_mb'].default})")
    add("--tls-cert", type=Path, help="PEM certificate chain; enables TLS")
    add("--tls-key", type=Path, help="PEM private key for --tls-cert")
    add("--tls-client-ca", type=Path, help="PEM CA bundle; clients must present a cert (mTLS)")
    add("--token-file", type=Path, help="file holding a bearer token every call must carry")
    add("--ready-file", type=Path,
        help="once serving, write {\"port\", \"metrics_port\", \"pid\"} as JSON here "
             "(for scripts and tests that start the server on port 0)")


def run(args: argparse.Namespace) -> int:
    from pretag.server.app import serve

    flags = {k: v for k, v in vars(args).items() if k in KNOWN | {"metrics"}}
    try:
        file_values = read_config_file(args.config) if args.config else {}
        config = build_config(file_values, flags)
        if config.token_file is not None:
            read_token_file(config.token_file)  # refuse an empty one before binding
    except (ConfigError, TokenFileError) as exc:
        log.error("%s", exc)
        return 2
    try:
        asyncio.run(serve(config, ready_file=args.ready_file))
    except (BackendError, OSError) as exc:
        log.error("%s", exc)
        return 1
    return 0
