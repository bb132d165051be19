"""Local folders and object storage (``s3://``, ``gs://``, any fsspec URL) behind one path type.

Local paths stay :class:`pathlib.Path`; URLs become universal_pathlib's ``UPath`` (fsspec
underneath: s3fs, gcsfs), which has the methods the job uses (``/``, ``read_bytes``,
``write_bytes``, ``exists``, ``glob``, ``unlink``, ``stat``). Every write is whole: locally
a temporary file renamed over the target, on object storage one PUT, so an object is
visible complete or not at all. Credentials and endpoints come the usual way (``AWS_*``
variables including ``AWS_ENDPOINT_URL`` for S3-compatible stores, ``AWS_PROFILE``,
``GOOGLE_APPLICATION_CREDENTIALS``).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import TypeAlias

from upath import UPath

AnyPath: TypeAlias = Path | UPath


class StorageError(OSError):
    """A bucket or object that cannot be reached (missing, denied); exit code 2."""


def location(text: str | os.PathLike[str]) -> AnyPath:
    """A local path, or a UPath for a URL (``file://`` URLs are local paths)."""
    value = os.fspath(text)
    if value.startswith("file://"):
        return Path(value[len("file://"):])
    if "://" in value:
        return UPath(value)
    return Path(value)


def write_whole(path: AnyPath, data: bytes) -> None:
    """Write ``data`` to ``path`` so that no reader ever sees part of it.

    Locally through a fixed temporary name (``.<name>.tmp``) and a rename: a run killed in
    between leaves the temporary, which the re-run that redoes that file writes again and
    renames away. On object storage one PUT does the same.
    """
    if not isinstance(path, Path):
        try:
            path.write_bytes(data)
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


def find_under(path: UPath) -> list[str]:
    """Every object under the prefix ``path`` (one listing), as paths relative to it;
    none when the prefix does not exist."""
    root = path.path.rstrip("/")
    try:
        found = path.fs.find(root)
    except FileNotFoundError:
        return []
    return [p[len(root) + 1:] for p in found if p.startswith(root + "/")]


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
    except OSError as exc:
        raise StorageError(f"cannot use {path}: {exc}") from None
