"""Image and object vectors of a run, stored as Parquet shards (float16 vectors).

Layout under the output folder::

    .lightly/embeddings/lightly_pretagging/images-000001.parquet    filename[, vector]
    .lightly/embeddings/lightly_pretagging/objects-000001.parquet   filename, detection,
                                                                     label, score, box, vector

Images are buffered and written ``shard_images`` at a time; each file is written to a
temporary name and renamed, objects shard first, images shard last. The images shard
lists every image the shard pair covers (with a ``vector`` column when image vectors
are stored), so it is what marks them done: an objects shard without its images shard
(a kill between the two renames) is deleted on resume and its images are redone. A
kill loses at most the shard being filled; an image is never stored twice.
"""

from __future__ import annotations

import csv
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pretag.job.outputs import TASK, Answer
from pretag.job.storage import AnyPath, write_whole

log = logging.getLogger(__name__)

MODES = ("none", "image", "objects", "all")
_SHARD = re.compile(r"^(images|objects)-(\d{6,})\.parquet$")


def _number(path: AnyPath) -> str:
    """The number of a shard file (images-NNNNNN.parquet, objects-NNNNNN...; six digits
    or more: the Ray executor numbers a block's shard from its first image's position)."""
    match = _SHARD.match(path.name)
    if match is None:
        raise ValueError(f"{path.name} is not a shard file")
    return match.group(2)


def embeddings_dir(output_dir: AnyPath) -> AnyPath:
    return output_dir / ".lightly" / "embeddings" / TASK


def _vectors(rows: list[np.ndarray], dim: int) -> pa.FixedSizeListArray:
    if dim < 1:  # Arrow cannot make a list type of size 0
        raise ValueError(f"vector size must be positive, not {dim}")
    flat = (np.concatenate(rows).astype(np.float16) if rows
            else np.zeros((0,), np.float16)).reshape(-1)
    return pa.FixedSizeListArray.from_arrays(pa.array(flat, pa.float16()), dim)


def write_table(table: pa.Table, path: AnyPath) -> None:
    """``table`` as Parquet at ``path``; the vectors without dictionary encoding (float16
    values repeat too rarely for it to pay, and it made reading them 5x slower)."""
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, use_dictionary=[c for c in table.column_names if c != "vector"])
    write_whole(path, sink.getvalue().to_pybytes())


def _parquet(path: AnyPath) -> pq.ParquetFile:
    """A shard opened once for its schema, row count and columns (on object storage a
    seekable file: the footer alone is fetched until columns are read)."""
    return pq.ParquetFile(path if isinstance(path, Path) else path.open("rb"))


@dataclass
class Shard:
    """What one flush writes: the images it covers and their rows."""

    number: int
    object_dim: int = 0  # the model's object vector size: a shard without objects needs it
    names: list[str] = field(default_factory=list)
    image_vectors: list[np.ndarray] = field(default_factory=list)
    objects: list[tuple[str, int, str, float, tuple[float, ...], np.ndarray]] = field(
        default_factory=list)

    @staticmethod
    def check(name: str, pred: Answer, images: bool, objects: bool) -> None:
        """ValueError when the answer lacks the vectors asked for."""
        if images and pred.embedding is None:
            raise ValueError(f"the server sent no image vector for {name}")
        if objects and pred.scores and pred.object_embeddings is None:
            raise ValueError(f"the server sent no object vectors for {name}")

    def add(self, name: str, pred: Answer, images: bool, objects: bool) -> None:
        """Take ``name``'s vectors (:meth:`check` them first)."""
        self.check(name, pred, images, objects)
        self.names.append(name)
        if images and pred.embedding is not None:
            self.image_vectors.append(pred.embedding.reshape(1, -1))
        if objects and pred.scores and pred.object_embeddings is not None:
            for i, (box, label, score) in enumerate(zip(pred.boxes, pred.labels, pred.scores,
                                                        strict=True)):
                self.objects.append((name, i, label, score, tuple(box),
                                     pred.object_embeddings[i]))


class VectorStore:
    """Buffers the vectors of finished images and writes them in shards (see above)."""

    def __init__(self, output_dir: AnyPath, mode: str, shard_images: int,
                 object_dim: int = 0) -> None:
        if mode not in MODES or mode == "none":
            raise ValueError(f"vector mode must be one of {MODES[1:]}, not {mode!r}")
        self.root = embeddings_dir(output_dir)
        self.images = mode in ("image", "all")
        self.objects = mode in ("objects", "all")
        if self.objects and object_dim < 1:
            raise ValueError("object vectors need the model's object vector size")
        self.shard_images = shard_images
        self.object_dim = object_dim
        self.done = self._resume()
        numbers = [int(_number(p)) for p in self._files() if _SHARD.match(p.name)]
        self.pending = Shard(max(numbers, default=0) + 1, object_dim)

    def _files(self) -> list[AnyPath]:
        return list(self.root.glob("*.parquet")) if self.root.is_dir() else []

    def _resume(self) -> set[str]:
        """Names already stored with what this mode needs; orphans and temporaries removed."""
        if not self.root.is_dir():
            return set()
        for tmp in self.root.glob(".*.tmp"):
            tmp.unlink()
        images = {_number(p): p for p in self.root.glob("images-*.parquet")}
        covered: set[str] = set()
        for path in self.root.glob("objects-*.parquet"):
            if _number(path) not in images:
                log.info("removing %s: its images shard was never written", path.name)
                path.unlink()
        for number, path in sorted(images.items()):
            with _parquet(path) as shard:
                if self.images and "vector" not in shard.schema_arrow.names:
                    continue  # written by a run that stored object vectors only
                if self.objects and not (self.root / f"objects-{number}.parquet").exists():
                    continue  # written by a run that stored image vectors only
                covered.update(shard.read(columns=["filename"])["filename"].to_pylist())
        return covered

    def needs(self, name: str) -> bool:
        return name not in self.done

    def check(self, name: str, pred: Answer) -> None:
        """ValueError when ``pred`` lacks the vectors this store keeps."""
        Shard.check(name, pred, self.images, self.objects)

    def add(self, name: str, pred: Answer) -> Shard | None:
        """Buffer ``name``'s vectors, once its prediction is stored (an image is done
        only when all of it is); returns a full shard to write, if this filled one."""
        if name in self.done:
            return None
        self.pending.add(name, pred, self.images, self.objects)
        self.done.add(name)
        if len(self.pending.names) >= self.shard_images:
            return self.take()
        return None

    def take(self) -> Shard | None:
        """The buffered shard (None if empty); a new one starts."""
        shard = self.pending
        if not shard.names:
            return None
        self.pending = Shard(shard.number + 1, self.object_dim)
        return shard

    def write(self, shard: Shard) -> None:
        write_shard(self.root, shard, self.images, self.objects)


def write_shard(root: AnyPath, shard: Shard, images: bool, objects: bool) -> None:
    """Objects shard first, images shard last (it marks the images done)."""
    if objects:
        rows = shard.objects  # none when no image of the shard has a detection
        dim = rows[0][5].shape[0] if rows else shard.object_dim
        table = pa.table({
            "filename": pa.array([r[0] for r in rows], pa.string()),
            "detection": pa.array([r[1] for r in rows], pa.int32()),
            "label": pa.array([r[2] for r in rows], pa.string()),
            "score": pa.array([r[3] for r in rows], pa.float32()),
            "box": pa.FixedSizeListArray.from_arrays(
                pa.array(np.array([r[4] for r in rows], np.float32).reshape(-1)), 4),
            "vector": _vectors([r[5].reshape(1, -1) for r in rows], dim),
        })
        write_table(table, root / f"objects-{shard.number:06d}.parquet")
    columns: dict[str, Any] = {"filename": pa.array(shard.names, pa.string())}
    if images:
        columns["vector"] = _vectors(shard.image_vectors, shard.image_vectors[0].shape[1])
    write_table(pa.table(columns), root / f"images-{shard.number:06d}.parquet")


def _shards(output_dir: AnyPath, kind: str) -> Iterator[AnyPath]:
    root = embeddings_dir(output_dir)
    paths: list[AnyPath] = sorted(root.glob(f"{kind}-*.parquet"),
                                  key=lambda p: (int(_number(p)), p.name))
    for path in paths:
        if kind == "objects" and not (root / f"images-{_number(path)}.parquet").exists():
            continue
        yield path


class VectorError(ValueError):
    """A stored vector shard cannot be used; the message names the file."""


def vector_shards(output_dir: AnyPath, kind: str = "images") -> tuple[list[AnyPath], int]:
    """The shards of a run holding ``kind`` vectors, in order, and their rows in all."""
    paths, total = [], 0
    for path in _shards(output_dir, kind):
        try:
            with _parquet(path) as shard:
                if "vector" in shard.schema_arrow.names:
                    paths.append(path)
                    total += shard.metadata.num_rows
        except (pa.ArrowException, OSError) as exc:
            raise VectorError(f"{path} is not a readable vector shard ({exc})") from None
    return paths, total


def read_vectors(path: AnyPath, dim: int | None = None, dtype: Any = np.float32,
                 check: bool = True) -> tuple[list[str], np.ndarray]:
    """One shard's (filenames, ``dtype`` [rows, D]: float32 unless asked for another, or
    for None: as stored, float16 from pretag run, then read-only); a shard of another
    length than ``dim`` or (``check``) holding values that are not finite is a
    :class:`VectorError` naming it."""
    try:
        with _parquet(path) as shard:
            table = shard.read(columns=["filename", "vector"])
    except (pa.ArrowException, OSError) as exc:
        raise VectorError(f"{path} is not a readable vector shard ({exc})") from None
    vectors = table["vector"].combine_chunks()
    size = _size(path, vectors.type, dim)
    block = vectors.flatten().to_numpy(zero_copy_only=False).reshape(-1, size)
    block = block if dtype is None else block.astype(dtype, copy=False)
    bad = int((~np.isfinite(block)).any(axis=1).sum()) if check else 0
    if bad:
        raise not_finite(path, bad)
    return table["filename"].to_pylist(), block


def not_finite(path: AnyPath, rows: int) -> VectorError:
    return VectorError(f"{path}: {rows} vectors hold values that are not finite (NaN or "
                       f"inf); run pretag run --overwrite to store them again")


def _size(path: AnyPath, kind: pa.DataType, dim: int | None) -> int:
    size = getattr(kind, "list_size", None)
    if size is None or (dim is not None and size != dim):
        raise VectorError(f"{path} holds vectors of {size or 'no fixed'} values, the shards "
                          f"before it {dim if dim is not None else '?'}: it does "
                          f"not belong to this run (run pretag run --overwrite)")
    return int(size)


def vector_names(path: AnyPath, dim: int | None = None) -> tuple[list[str], int]:
    """One shard's filenames and vector length (another than ``dim``: a
    :class:`VectorError` naming it), its vectors left unread."""
    try:
        with _parquet(path) as shard:
            kind = shard.schema_arrow.field("vector").type
            names = shard.read(columns=["filename"])["filename"].to_pylist()
    except (pa.ArrowException, OSError, KeyError) as exc:
        raise VectorError(f"{path} is not a readable vector shard ({exc})") from None
    return names, _size(path, kind, dim)


def load_embeddings(output_dir: AnyPath, kind: str = "images") -> tuple[list[str], np.ndarray]:
    """(filenames, float32 [rows, D]) of a run's image (or object) vectors.

    The array is allocated once from the shards' row counts and filled shard by shard,
    so a million rows never sit in memory twice (besides one shard's). A shard that is
    not Parquet, holds vectors of another length than the others' or values that are not
    finite is a :class:`VectorError` naming it.
    """
    paths, total = vector_shards(output_dir, kind)
    names: list[str] = []
    out: np.ndarray | None = None
    row = 0
    for path in paths:
        shard_names, block = read_vectors(path, None if out is None else out.shape[1])
        if out is None:
            out = np.empty((total, block.shape[1]), np.float32)
        out[row:row + len(block)] = block
        names.extend(shard_names)
        row += len(block)
        del block
    return names, out if out is not None else np.zeros((0, 0), np.float32)


def write_csv(output_dir: AnyPath, out: TextIO) -> int:
    """Lightly's embeddings.csv layout (filenames, embedding_0.., labels) of the image
    vectors, shard by shard; returns the number of rows."""
    writer = csv.writer(out)
    rows = 0
    for path in _shards(output_dir, "images"):
        with _parquet(path) as shard:
            table = shard.read()
        if "vector" not in table.column_names:
            continue
        vectors = table["vector"].combine_chunks()
        dim = vectors.type.list_size
        if rows == 0:
            writer.writerow(["filenames", *(f"embedding_{i}" for i in range(dim)), "labels"])
        values = vectors.flatten().to_numpy().astype(np.float32).reshape(-1, dim)
        for name, vector in zip(table["filename"].to_pylist(), values, strict=True):
            writer.writerow([name, *(f"{v:.6g}" for v in vector), 0])
        rows += len(table)
    return rows
