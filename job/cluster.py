"""A connection to a Ray cluster for the jobs that run on one (``pretag run --ray``,
``pretag select --ray``): joined at an address, or a local cluster started for the job;
an address nothing listens on, a missing environment variable or a cluster too small
for what the job needs are :class:`~pretag.job.stream.RunError` (exit 2), never a hang."""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from pretag.job.stream import RunError

log = logging.getLogger(__name__)

#: Variables the job's workers get from the driver's environment by default: where
#: object storage is, never credentials (workers take those from their own nodes).
DEFAULT_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION")


@dataclass(frozen=True)
class Needs:
    """What the job's actors take of the cluster, and how to name them in a message."""

    cpus: float
    gpus: float = 0.0
    what: str = "the actors"
    note: str = ""  # e.g. " (one for reading and writing)"


def _check_address(address: str) -> None:
    """Fail fast on an address nothing listens on (ray.init would retry for minutes)."""
    if address == "auto":
        return
    target = address.split("://", 1)[-1]
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        raise RunError(f"--ray {address}: expected HOST:PORT (the head's GCS port, 6379 by "
                       f"default), ray://HOST:PORT or auto")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=5).close()
    except OSError as exc:
        raise RunError(f"the Ray cluster at {address} cannot be reached ({exc}); start one "
                       f"with `ray start --head`, or leave out the address to start a local "
                       f"one for this job") from None


@contextmanager
def connected(address: str | None, env: Sequence[str], needs: Needs) -> Iterator[str]:
    """A Ray connection (a local cluster when ``address`` is None); yields where it runs.
    ``env``: more of this process's variables for the workers. A caller already connected
    (ray.is_initialized) keeps its own."""
    try:
        import ray
        import ray.exceptions
    except ImportError as exc:  # ray is the `ray` extra
        raise RunError(f"--ray needs Ray Data: pip install 'pretag[ray]' ({exc})") from None

    if ray.is_initialized():
        yield "ray (this process's connection)"
        return
    names = dict.fromkeys((*DEFAULT_ENV, *env))
    values = {name: os.environ[name] for name in names if name in os.environ}
    missing = [name for name in env if name not in os.environ]
    if missing:
        raise RunError(f"--ray-env {', '.join(missing)}: not set in this environment")
    runtime_env: dict[str, Any] = {"env_vars": values} if values else {}
    if address is None:
        # "local": a new cluster even if one was started on this machine before
        ray.init(address="local", include_dashboard=False, runtime_env=runtime_env)
    else:
        _check_address(address)
        try:
            ray.init(address=address, runtime_env=runtime_env)
        except (ConnectionError, RuntimeError, ValueError, ray.exceptions.RayError) as exc:
            raise RunError(f"cannot join the Ray cluster at {address}: "
                           f"{str(exc).splitlines()[0]} (a cluster with token authentication "
                           f"needs RAY_AUTH_MODE=token here, and its token in RAY_AUTH_TOKEN "
                           f"or ~/.ray/auth_token)") from None
    try:
        _check_resources(address, needs)
        yield f"ray {address or 'local'}"
    finally:
        ray.shutdown()


def _check_resources(address: str | None, needs: Needs) -> None:
    """Refuse what a local cluster cannot hold (Ray would wait for it forever); an
    autoscaling cluster may grow, so there this is only a warning."""
    import ray

    have = ray.cluster_resources()
    cpus, gpus = have.get("CPU", 0.0), have.get("GPU", 0.0)
    if cpus >= needs.cpus and gpus >= needs.gpus:
        return
    message = (f"{needs.what} need {needs.cpus:g} CPUs{needs.note} and {needs.gpus:g} GPUs; "
               f"the cluster has {cpus:g} and {gpus:g}")
    if address is None:
        raise RunError(f"{message}: ask for fewer actors or fewer --ray-cpus-per-actor")
    log.warning("%s now; the job waits until it grows", message)
