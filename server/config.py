"""Server settings: one frozen dataclass, filled from defaults < config file < flags."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from pretag.preprocess import DEFAULT_MAX_PIXELS
from pretag.server.engine import EngineConfig


class ConfigError(ValueError):
    """Settings that cannot work together, or an unreadable config file."""


@dataclass(frozen=True)
class ServerConfig:
    model: Path
    host: str = "[::]"
    port: int = 50051
    providers: tuple[str, ...] | None = None  # None: TensorRT, CUDA, CPU as available
    instances: int = 1
    threads: int | None = None  # ONNX Runtime intra-op threads per instance
    max_batch_size: int = 8
    max_queue_delay_ms: float = 2.0
    max_queue: int = 256
    max_pixels: int = DEFAULT_MAX_PIXELS
    decode_threads: int = 0
    decode_memory_mb: int = 1024
    score_threshold: float | None = None
    warmup: bool = True
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
        if self.max_batch_size < 1 or self.max_queue < 1 or self.instances < 1:
            problems.append("max_batch_size, max_queue and instances must be at least 1")
        if self.max_queue_delay_ms < 0 or self.grace_s < 0:
            problems.append("max_queue_delay_ms and grace_s cannot be negative")
        if self.max_message_mb < 1 or self.decode_memory_mb < 1:
            problems.append("max_message_mb and decode_memory_mb must be at least 1")
        if (self.tls_cert is None) != (self.tls_key is None):
            problems.append("tls_cert and tls_key go together")
        if self.tls_client_ca is not None and self.tls_cert is None:
            problems.append("tls_client_ca (mutual TLS) needs tls_cert and tls_key")
        if self.score_threshold is not None and not 0 <= self.score_threshold <= 1:
            problems.append("score_threshold must be in [0, 1]")
        for name in ("model", "tls_cert", "tls_key", "tls_client_ca", "token_file"):
            path = getattr(self, name)
            if path is not None and not Path(path).is_file():
                problems.append(f"{name}: {path} is not a file")
        if problems:
            raise ConfigError("; ".join(problems))

    def metrics_address(self) -> str:
        """Where the metrics endpoint binds: metrics_host, else the gRPC host."""
        host = self.metrics_host if self.metrics_host is not None else self.host
        return host[1:-1] if host.startswith("[") and host.endswith("]") else host

    def engine(self) -> EngineConfig:
        return EngineConfig(
            max_batch_size=self.max_batch_size, max_queue_delay_ms=self.max_queue_delay_ms,
            max_queue=self.max_queue, instances=self.instances, max_pixels=self.max_pixels,
            decode_threads=self.decode_threads, decode_memory_mb=self.decode_memory_mb,
            score_threshold=self.score_threshold,
            warmup=self.warmup)


_PATHS = {"model", "tls_cert", "tls_key", "tls_client_ca", "token_file"}


def read_config_file(path: Path) -> dict[str, Any]:
    """Settings from a TOML file whose keys are the flag names (dashes or underscores).

    ``metrics = false`` stands for ``--no-metrics`` (TOML has no null for metrics_port).
    """
    try:
        data = tomllib.loads(Path(path).read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from exc
    values = {k.replace("-", "_"): v for k, v in data.get("serve", data).items()}
    metrics = values.pop("metrics", True)
    if not isinstance(metrics, bool):
        raise ConfigError(f"{path}: metrics must be true or false, not {metrics!r}")
    if not metrics:
        if "metrics_port" in values:
            raise ConfigError(f"{path}: metrics = false and metrics_port contradict each other")
        values["metrics_port"] = None
    known = {f.name for f in fields(ServerConfig)}
    unknown = sorted(values.keys() - known)
    if unknown:
        raise ConfigError(f"unknown settings in {path}: {', '.join(unknown)}")
    base = Path(path).parent
    for key in _PATHS & values.keys():  # relative paths are relative to the file
        values[key] = base / values[key]
    return values


def build_config(file_values: dict[str, Any], flag_values: dict[str, Any]) -> ServerConfig:
    """Merge settings, flags winning over the file; check types loosely, values strictly."""
    values = {**file_values, **{k: v for k, v in flag_values.items() if v is not None}}
    if "model" not in values:
        raise ConfigError("no model given: pass --model FILE.onnx or set model in --config")
    for key in _PATHS & values.keys():
        values[key] = Path(values[key])
    if values.get("providers") is not None:
        values["providers"] = tuple(values["providers"])
    try:
        return ServerConfig(**values)
    except TypeError as exc:
        raise ConfigError(str(exc)) from exc

