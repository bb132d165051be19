"""Server settings: one tree of frozen dataclasses, each default and check written once.

    ServerConfig         network, security, lifecycle
      backend: BackendConfig    ONNX Runtime providers, their options, threads
      engine: EngineConfig      decoding, thresholds, warm-up
        batching: BatchingConfig   batch size, delay, queue bound, instances

Settings arrive flat, named as the flags (``max_batch_size``): defaults < a TOML
``--config`` file < flags. :func:`server_config` routes flat names into the tree.
"""

from __future__ import annotations

import logging
import os
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from pretag.contract import threshold_problem
from pretag.preprocess import DEFAULT_DECODE_MEMORY_MB, DEFAULT_MAX_PIXELS
from pretag.runtime.backend import (
    DEFAULT_MAX_BATCH_SIZE,
    BackendConfig,
    BackendError,
    parse_provider_options,
    resolve_providers,
    session_layout,
)

log = logging.getLogger(__name__)

#: ``--instances auto``: sessions and threads chosen from the cores and the model.
AUTO = "auto"


class ConfigError(ValueError):
    """Settings that cannot work together, or an unreadable config file."""


def _refuse(problems: list[str]) -> None:
    if problems:
        raise ConfigError("; ".join(problems))


@dataclass(frozen=True)
class BatchingConfig:
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE
    max_queue_delay_ms: float = 2.0
    max_queue: int = 256  # images accepted and not yet computing; more get RESOURCE_EXHAUSTED
    instances: int = 1  # model sessions running batches at once

    def __post_init__(self) -> None:
        problems = []
        if self.max_batch_size < 1 or self.max_queue < 1 or self.instances < 1:
            problems.append("max_batch_size, max_queue and instances must be at least 1")
        if self.max_queue_delay_ms < 0:
            problems.append("max_queue_delay_ms cannot be negative")
        _refuse(problems)


@dataclass(frozen=True)
class EngineConfig:
    batching: BatchingConfig = field(default_factory=BatchingConfig)
    max_pixels: int = DEFAULT_MAX_PIXELS
    decode_threads: int = 0  # 0: one per core
    # decodes running at once stay under this (one may exceed)
    decode_memory_mb: int = DEFAULT_DECODE_MEMORY_MB
    score_threshold: float | None = None  # None: the model's own
    warmup: bool = True
    #: decode JPEGs at full size before resizing; default: at 1/2, 1/4 or 1/8 where the
    #: canvas allows (libjpeg DCT scaling, 2-3x faster on large frames; boxes shift <2 px)
    full_decode: bool = False

    def __post_init__(self) -> None:
        problems = []
        if self.max_pixels < 1 or self.decode_memory_mb < 1 or self.decode_threads < 0:
            problems.append("max_pixels and decode_memory_mb must be at least 1, "
                            "decode_threads at least 0")
        if self.score_threshold is not None:
            problem = threshold_problem(self.score_threshold)
            if problem:
                problems.append(problem)
        _refuse(problems)


@dataclass(frozen=True)
class ServerConfig:
    model: Path
    engine: EngineConfig = field(default_factory=EngineConfig)
    backend: BackendConfig = field(default_factory=BackendConfig)  # one session per instance
    host: str = "[::]"
    port: int = 50051
    metrics_port: int | None = 8000  # None: no metrics endpoint; 0: a free port
    metrics_host: str | None = None  # None: the same address as host
    grace_s: float = 30.0
    max_message_mb: int = 64
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    token_file: Path | None = None

    def __post_init__(self) -> None:
        problems = []
        if self.grace_s < 0:
            problems.append("grace_s cannot be negative")
        if self.max_message_mb < 1:
            problems.append("max_message_mb must be at least 1")
        if (self.tls_cert is None) != (self.tls_key is None):
            problems.append("tls_cert and tls_key go together")
        if self.tls_client_ca is not None and self.tls_cert is None:
            problems.append("tls_client_ca (mutual TLS) needs tls_cert and tls_key")
        for name in _PATHS:
            path = getattr(self, name)
            if path is not None and not Path(path).is_file():
                problems.append(f"{name}: {path} is not a file")
        _refuse(problems)

    @property
    def batching(self) -> BatchingConfig:
        return self.engine.batching

    @property
    def max_message_bytes(self) -> int:
        return self.max_message_mb * 1024 * 1024

    def metrics_address(self) -> str:
        """Where the metrics endpoint binds: metrics_host, else the gRPC host."""
        host = self.metrics_host if self.metrics_host is not None else self.host
        return host[1:-1] if host.startswith("[") and host.endswith("]") else host


_PATHS = ("model", "tls_cert", "tls_key", "tls_client_ca", "token_file")
_BATCHING = {f.name for f in fields(BatchingConfig)}
_ENGINE = {f.name for f in fields(EngineConfig)} - {"batching"}
_BACKEND = {f.name for f in fields(BackendConfig)}
_SERVER = {f.name for f in fields(ServerConfig)} - {"engine", "backend"}
KNOWN = _BATCHING | _ENGINE | _BACKEND | _SERVER  # the flat names: flags and config-file keys


def server_config(**values: Any) -> ServerConfig:
    """A :class:`ServerConfig` from flat settings named as the flags. ``instances`` may be
    ``"auto"`` (the default here, not in :class:`BatchingConfig`): sessions and threads
    chosen from the cores and the model (:func:`pretag.runtime.backend.session_layout`)."""
    unknown = sorted(values.keys() - KNOWN)
    if unknown:
        raise ConfigError(f"unknown settings: {', '.join(unknown)}")
    if values.get("instances") in (None, AUTO):
        values = _auto_layout(values)
    elif isinstance(values["instances"], bool) or not isinstance(values["instances"], int):
        raise ConfigError(f"instances must be a whole number or {AUTO!r}, not "
                          f"{values['instances']!r}")
    for key in set(_PATHS) & values.keys():
        if values[key] is not None:
            values[key] = Path(values[key])
    if values.get("providers") is not None:
        values["providers"] = tuple(values["providers"])
    try:
        if isinstance(values.get("provider_options"), list):  # the flags: PROVIDER:KEY=VALUE
            values["provider_options"] = parse_provider_options(values["provider_options"])
        batching = BatchingConfig(**{k: v for k, v in values.items() if k in _BATCHING})
        engine = EngineConfig(batching=batching,
                              **{k: v for k, v in values.items() if k in _ENGINE})
        backend = BackendConfig(**{k: v for k, v in values.items()
                                   if k in _BACKEND and v is not None})
        _refuse([backend.problem() or ""] if backend.problem() else [])
        return ServerConfig(engine=engine, backend=backend,
                            **{k: v for k, v in values.items() if k in _SERVER})
    except (TypeError, BackendError) as exc:
        raise ConfigError(str(exc)) from exc


def _auto_layout(values: dict[str, Any]) -> dict[str, Any]:
    """``instances: auto`` resolved for the model and providers the settings name."""
    import onnxruntime as ort

    model = Path(values.get("model") or "")
    if not model.is_file():  # ServerConfig says so
        return {**values, "instances": BatchingConfig.instances}
    try:
        providers = resolve_providers(values.get("providers"), ort.get_available_providers())
    except BackendError as exc:
        raise ConfigError(str(exc)) from exc
    threads = values.get("threads")
    if threads is not None and (not isinstance(threads, int) or threads < 1):
        raise ConfigError("threads must be at least 1")
    instances, threads = session_layout(model, providers, os.cpu_count() or 1, threads)
    log.info("--instances auto: %d session(s) x %d thread(s) for %s (%.1f MB) on %s",
             instances, threads, model.name, model.stat().st_size / 2**20, providers[0])
    return {**values, "instances": instances, "threads": threads}


def _metrics_switch(values: dict[str, Any], source: str) -> dict[str, Any]:
    """``metrics: false`` (the --no-metrics flag, or ``metrics = false`` in a file) means
    no metrics endpoint: metrics_port None. Contradicting it in the same source is an error."""
    values = dict(values)
    metrics = values.pop("metrics", None)
    if metrics is None:
        return values
    if not isinstance(metrics, bool):
        raise ConfigError(f"{source}: metrics must be true or false, not {metrics!r}")
    if not metrics:
        if values.get("metrics_port") is not None:
            said = ("--no-metrics and --metrics-port" if source == "flags"
                    else f"{source}: metrics = false and metrics_port")
            raise ConfigError(f"{said} contradict each other")
        values["metrics_port"] = None
    return values


def read_config_file(path: Path) -> dict[str, Any]:
    """Settings from a TOML file whose keys are the flag names (dashes or underscores).

    ``metrics = false`` stands for ``--no-metrics`` (TOML has no null for metrics_port).
    """
    try:
        data = tomllib.loads(Path(path).read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from exc
    values = {k.replace("-", "_"): v for k, v in data.get("serve", data).items()}
    values = _metrics_switch(values, str(path))
    unknown = sorted(values.keys() - KNOWN)
    if unknown:
        raise ConfigError(f"unknown settings in {path}: {', '.join(unknown)}")
    base = Path(path).parent
    for key in set(_PATHS) & values.keys():  # relative paths are relative to the file
        values[key] = base / values[key]
    return values


def build_config(file_values: dict[str, Any], flag_values: dict[str, Any]) -> ServerConfig:
    """Merge settings, flags winning over the file (None: a flag not given)."""
    flags = _metrics_switch({k: v for k, v in flag_values.items() if v is not None}, "flags")
    values = {**file_values, **flags}
    if "model" not in values:
        raise ConfigError("no model given: pass --model FILE.onnx or set model in --config")
    return server_config(**values)
