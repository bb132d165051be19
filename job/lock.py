"""One job at a time in an output folder: ``DIR/.lightly/pretag.lock``.

Two runs (or a run and a selection) writing one folder would overwrite each other's
vector shards, so each holds the folder while it writes and a second is refused with
exit 2, naming the holder (host, pid, command, since when).

* **Local disks**: an exclusive ``flock`` on the lock file, which also records the holder.
  The kernel drops the lock when its process dies however it dies (SIGKILL included), so
  a lock left by a killed run is never in the way: the next run takes it and says whose it
  was. On NFS, Linux maps ``flock`` to byte-range locks held by the server (NFSv4).
* **Object storage**: a lease object. It is created only if absent (S3's conditional
  ``If-None-Match: *`` PUT, through s3fs's ``mode="create"``), rewritten with a fresh
  heartbeat every :data:`HEARTBEAT_S` seconds and deleted at the end. A lease whose
  heartbeat is older than :data:`STALE_S` (or that names a process of this host that is
  gone) belongs to a run that died and is taken over: deleted, then created again
  conditionally, so that of two runs taking over at once one wins. Guaranteed on stores
  with conditional PUTs (AWS S3, and moto's server in the tests); elsewhere pretag writes
  the lease, waits and reads it back, which narrows but cannot close the window in which
  two runs starting within a second both proceed. The heartbeat uses each machine's
  clock: clocks apart by more than STALE_S - HEARTBEAT_S could take over a live lease.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from upath import UPath

from pretag.job.storage import AnyPath, put
from pretag.job.stream import RunError, StoreOutage

log = logging.getLogger(__name__)

HEARTBEAT_S = 30.0
STALE_S = 120.0


class FolderBusy(RunError):
    """Another job holds the output folder (exit code 2)."""


def lock_path(output_dir: AnyPath) -> AnyPath:
    return output_dir / ".lightly" / "pretag.lock"


def _holder(what: str) -> dict[str, Any]:
    return {"owner": uuid.uuid4().hex, "what": what, "host": socket.gethostname(),
            "pid": os.getpid(), "command": " ".join(sys.argv), "started": time.time(),
            "heartbeat": time.time()}


def _describe(text: str) -> str:
    try:
        holder = json.loads(text)
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(holder["started"])))
        return (f"{holder.get('what', 'a job')} (pid {holder['pid']} on {holder['host']}, "
                f"since {since}: {holder.get('command', '')})")
    except (ValueError, KeyError, TypeError):
        return "another job (its lock file is unreadable)"


def _busy(output_dir: AnyPath, text: str) -> FolderBusy:
    return FolderBusy(f"{output_dir} is in use by {_describe(text)}; wait for it to end, "
                      f"or use another --output-dir")


@contextmanager
def hold(output_dir: AnyPath, what: str = "pretag run") -> Iterator[None]:
    """Hold ``output_dir`` for one job; :class:`FolderBusy` if another job holds it."""
    if isinstance(output_dir, Path):
        with _hold_local(output_dir, what):
            yield
    else:
        with _hold_remote(output_dir, what):
            yield


@contextmanager
def _hold_local(output_dir: Path, what: str) -> Iterator[None]:
    import fcntl

    path = output_dir / ".lightly" / "pretag.lock"  # lock_path, as a local Path
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise _busy(output_dir, path.read_text(errors="replace")) from None
        left = os.pread(fd, 65536, 0).decode(errors="replace")
        if left.strip():  # written by a job that ended without releasing it: it died
            log.warning("taking over %s, left by %s, which is no longer running", path,
                        _describe(left))
        data = json.dumps(_holder(what)).encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, data, 0)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)  # the file stays: unlinking it would race a new opener
    finally:
        os.close(fd)  # drops the flock


def _create(path: UPath, data: bytes) -> bool:
    """Create ``path`` only if absent; False if it exists. Stores without conditional
    writes: write, wait, read back."""
    try:
        put(path, data, mode="create")
        return True
    except FileExistsError:
        return False
    except (TypeError, NotImplementedError):  # no exclusive create on this filesystem
        if path.exists():
            return False
        put(path, data)
        time.sleep(1.0)
        return bool(path.read_bytes() == data)


@contextmanager
def _hold_remote(output_dir: UPath, what: str) -> Iterator[None]:
    path = lock_path(output_dir)
    assert isinstance(path, UPath)
    holder = _holder(what)
    if not _create(path, json.dumps(holder).encode()):
        text = path.read_text()
        try:
            left = json.loads(text)
            age = time.time() - float(left["heartbeat"])
        except (ValueError, KeyError, TypeError):
            left, age = {}, STALE_S + 1
        if age < STALE_S and not _gone(left):
            raise _busy(output_dir, text)
        log.warning("taking over %s, left by %s (no heartbeat for %.0f s%s)", path,
                    _describe(text), age, "; that process is gone" if _gone(left) else "")
        path.unlink(missing_ok=True)
        if not _create(path, json.dumps(holder).encode()):
            raise _busy(output_dir, path.read_text())
    stop = threading.Event()
    beat = threading.Thread(target=_heartbeat, args=(path, holder, stop), daemon=True,
                            name="pretag-lock")
    beat.start()
    try:
        yield
    except StoreOutage:  # the store does not answer: the lease cannot be removed now
        stop.set()  # (a heartbeat stuck on it is a daemon thread, not waited for)
        log.warning("%s stays until a later run takes it over (this host's) or it goes "
                    "stale (%d s): the store does not answer", path, STALE_S)
        raise
    except BaseException:
        stop.set()
        beat.join()
        _release(path, holder)
        raise
    stop.set()
    beat.join()
    _release(path, holder)


def _gone(holder: dict[str, Any]) -> bool:
    """True when ``holder`` was a process of this host that no longer runs (a run that
    stopped while the store was down could not delete its lease)."""
    if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
        return False
    try:
        os.kill(holder["pid"], 0)
    except ProcessLookupError:
        return True
    except OSError:  # alive, another user's
        return False
    return False


def _heartbeat(path: UPath, holder: dict[str, Any], stop: threading.Event) -> None:
    while not stop.wait(HEARTBEAT_S):
        try:
            if json.loads(path.read_text()).get("owner") != holder["owner"]:
                log.error("%s was taken over by another job; this one goes on", path)
                return
            put(path, json.dumps({**holder, "heartbeat": time.time()}).encode())
        except Exception as exc:  # the store is down: the job itself will say so
            log.warning("cannot refresh %s: %s", path, exc)


def _release(path: UPath, holder: dict[str, Any]) -> None:
    try:
        if json.loads(path.read_text()).get("owner") == holder["owner"]:
            path.unlink()
    except Exception as exc:  # a lease that is not removed goes stale and is taken over
        log.warning("cannot remove %s: %s", path, exc)
