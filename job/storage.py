"""Local folders and object storage (``s3://``, ``gs://``, any fsspec URL) behind one path type.

Local paths stay :class:`pathlib.Path`; URLs become universal_pathlib's ``UPath`` (fsspec
underneath: s3fs, gcsfs), which has the methods the job uses (``/``, ``read_bytes``,
``write_bytes``, ``exists``, ``glob``, ``unlink``, ``stat``). Every write is whole: locally
a temporary file renamed over the target, on object storage one PUT, so an object is
visible complete or not at all. Credentials and endpoints come the usual way (``AWS_*``
variables including ``AWS_ENDPOINT_URL`` for S3-compatible stores, ``AWS_PROFILE``,
``GOOGLE_APPLICATION_CREDENTIALS``).

Every storage call is bounded (:func:`storage_options`): on S3, botocore's connect and
read timeouts and its ``standard`` retry mode with :data:`ATTEMPTS` attempts (s3fs's own
retry loop is set to one try, so the bound is botocore's alone); on GCS, gcsfs's
``requests_timeout``. A call that still fails on the network is an outage of the store
(:func:`storage_outage`): the job stops with exit 2 naming the store, instead of blaming
an image or a detector.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any, TypeAlias
from urllib.parse import urlsplit

from upath import UPath

log = logging.getLogger(__name__)

AnyPath: TypeAlias = Path | UPath

#: Seconds a storage request may wait for an answer (botocore's read timeout); the
#: connect timeout is the smaller of this and 10 s. ``pretag run --storage-timeout-s``.
DEFAULT_TIMEOUT_S = 30.0
#: Tries of one storage request (botocore's ``standard`` retry mode: exponential backoff
#: with jitter, throttling and 5xx answers included). A frozen store thus fails a call
#: after about ATTEMPTS x timeout seconds.
ATTEMPTS = 3


class StorageError(OSError):
    """A bucket or object that cannot be reached (missing, denied); exit code 2."""


def storage_options(protocol: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> dict[str, Any]:
    """The fsspec options that bound every request to a store of ``protocol``."""
    # no listings cache: a job lists once, and a cache kept by fsspec's instance cache
    # would show the next job in this process a listing from before its last writes
    if protocol in ("s3", "s3a"):
        return {"use_listings_cache": False,
                "config_kwargs": {"connect_timeout": min(timeout_s, 10.0),
                                  "read_timeout": timeout_s,
                                  "retries": {"max_attempts": ATTEMPTS, "mode": "standard"}}}
    if protocol in ("gs", "gcs"):
        return {"use_listings_cache": False, "requests_timeout": timeout_s}
    return {}


def location(text: str | os.PathLike[str], timeout_s: float = DEFAULT_TIMEOUT_S) -> AnyPath:
    """A local path, or a UPath for a URL (``file://`` URLs are local paths) whose
    requests are bounded by ``timeout_s`` (see :func:`storage_options`)."""
    value = os.fspath(text)
    if value.startswith("file://"):
        return Path(value[len("file://"):])
    if "://" in value:
        protocol = value.split("://", 1)[0]
        path = UPath(value, **storage_options(protocol, timeout_s))
        _quiet_stray_failures()
        if protocol in ("s3", "s3a"):
            # s3fs's own retry loop (a class attribute, not an option) around botocore's:
            # one try, so that botocore's attempts are the bound (fsspec caches this
            # instance for every path with the same options)
            path.fs.retries = 1
        return path
    return Path(value)


_QUIET_LOOPS: set[int] = set()


def _quiet_stray_failures() -> None:
    """fsspec's I/O loop: a request task whose connection dies with the store (and that no
    caller waits for any more) is logged at debug level instead of asyncio's default, a
    traceback on stderr; the call that waited for it reports the outage itself."""
    try:
        from fsspec.asyn import get_loop
    except ImportError:
        return
    loop = get_loop()
    if id(loop) in _QUIET_LOOPS:
        return

    def handler(loop: Any, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        if exc is not None and isinstance(exc, _network_errors()):
            log.debug("a request to the store failed with nobody waiting for it: %r", exc)
            return
        loop.default_exception_handler(context)

    loop.set_exception_handler(handler)
    _QUIET_LOOPS.add(id(loop))


def _network_errors() -> tuple[type[BaseException], ...]:
    """Exception types that mean the store did not answer (not that an object is bad)."""
    found: list[type[BaseException]] = [TimeoutError, ConnectionError]
    try:
        from fsspec.exceptions import FSTimeoutError

        found.append(FSTimeoutError)
    except ImportError:
        pass
    try:  # s3fs's stack: botocore, and aiohttp underneath aiobotocore
        import aiohttp
        from botocore import exceptions as boto

        found += [boto.ConnectionError, boto.HTTPClientError, aiohttp.ClientConnectionError]
    except ImportError:
        pass
    return tuple(found)


def storage_outage(exc: BaseException) -> str | None:
    """What to say when ``exc`` means a store that cannot be used at all: it does not
    answer (connection refused or reset, timeouts after the bounded retries) or there
    are no credentials to sign for it; None for any other error."""
    if type(exc).__name__ == "NoCredentialsError":  # botocore's, before any request
        return ("no credentials for the object store: set AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or give the machine a role")
    if not isinstance(exc, _network_errors()):
        return None
    kwargs = getattr(exc, "kwargs", None)
    url = (kwargs.get("endpoint_url") if isinstance(kwargs, dict) else None) or \
        os.environ.get("AWS_ENDPOINT_URL") or ""
    parts = urlsplit(str(url))
    endpoint = f"{parts.scheme}://{parts.netloc}" if parts.netloc else "the object store"
    detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return (f"the store at {endpoint} does not answer ({type(exc).__name__}: {detail}; "
            f"{ATTEMPTS} attempts with a timeout each)")


def write_whole(path: AnyPath, data: bytes) -> None:
    """Write ``data`` to ``path`` so that no reader ever sees part of it.

    Locally through a fixed temporary name (``.<name>.tmp``) and a rename: a run killed in
    between leaves the temporary, which the re-run that redoes that file writes again and
    renames away. On object storage one PUT does the same.
    """
    if not isinstance(path, Path):
        try:
            put(path, data)
        except PermissionError as exc:
            raise StorageError(f"cannot write {path}: access denied ({exc})") from None
        except FileNotFoundError as exc:
            raise StorageError(f"cannot write {path}: the bucket does not exist ({exc})"
                               ) from None
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def call_budget(path: UPath) -> float:
    """Seconds one whole storage call on ``path`` may take: every attempt's connect and
    read timeouts, plus slack for the backoff between them."""
    options = path.storage_options
    timeout = float(options.get("config_kwargs", {}).get("read_timeout")
                    or options.get("requests_timeout") or DEFAULT_TIMEOUT_S)
    return ATTEMPTS * (timeout + min(timeout, 10.0)) + 5.0


def put(path: UPath, data: bytes, **kwargs: Any) -> None:
    """One PUT of ``data``, over within :func:`call_budget`. The bound is fsspec's own
    (``timeout`` of its sync bridge) because a PUT to a frozen store waits for botocore's
    ``Expect: 100-continue`` answer outside botocore's read timeout (aiohttp)."""
    if path.fs.async_impl:
        path.fs.pipe_file(path.path, data, timeout=call_budget(path), **kwargs)
    else:
        path.fs.pipe_file(path.path, data, **kwargs)


def find_sized(path: UPath) -> dict[str, int]:
    """Every object under the prefix ``path`` (one listing) with its size in bytes, by
    path relative to it; none when the prefix does not exist."""
    root = path.path.rstrip("/")
    try:
        found = path.fs.find(root, detail=True)
    except FileNotFoundError:
        return {}
    return {p[len(root) + 1:]: int(info.get("size") or 0) for p, info in found.items()
            if p.startswith(root + "/")}


def find_under(path: UPath) -> list[str]:
    """Every object under the prefix ``path`` (one listing), as paths relative to it;
    none when the prefix does not exist."""
    return list(find_sized(path))


def remove_tree(path: AnyPath) -> None:
    """Delete a folder (or prefix) and everything under it; nothing if it is absent."""
    if isinstance(path, Path):
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists():
        path.fs.rm(path.path, recursive=True)


def check_reachable(path: AnyPath) -> None:
    """StorageError unless the bucket behind ``path`` exists and can be listed (a local
    path always passes: its folders are made on the first write)."""
    if isinstance(path, Path):
        return
    bucket = path.path.split("/", 1)[0]
    try:
        path.fs.ls(bucket, detail=False)
    except PermissionError as exc:
        raise StorageError(f"cannot use {path}: access denied to bucket {bucket} ({exc})"
                           ) from None
    except FileNotFoundError:
        raise StorageError(f"cannot use {path}: bucket {bucket} does not exist") from None
    except Exception as exc:
        problem = storage_outage(exc)
        if problem is None and not isinstance(exc, OSError):
            raise
        raise StorageError(f"cannot use {path}: {problem or exc}") from None
