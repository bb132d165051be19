"""The codes of ``report/errors.jsonl``: one line per input that did not become a
prediction, ``{"path", "filename", "code", "reason"}``. Beside these, an image the server
refused carries the server's gRPC status name (INVALID_ARGUMENT for a bad image)."""

from __future__ import annotations

from enum import StrEnum
from typing import Any


class Code(StrEnum):
    READ = "READ"  # the file could not be read
    NOT_A_FILE = "NOT_A_FILE"  # listed as an image but a directory, broken link, FIFO, ...
    TOO_LARGE = "TOO_LARGE"  # over the servers' message limit (checked before sending)
    NAME = "NAME"  # a name the run folder cannot hold (see job.outputs.name_problem)
    WRITE = "WRITE"  # its prediction could not be written (the job goes on)
    VECTORS = "VECTORS"  # the answer lacked the vectors asked for
    STREAM = "STREAM"  # its stream broke max_attempts times
    INVALID_ARGUMENT = "INVALID_ARGUMENT"  # the image itself is refused (server or Ray read)
    VIDEO = "VIDEO"  # a video that cannot be read, or not to its end (frames read: "frames")
    STOP = "STOP"  # not written: the Ray stages' marker that the whole job must stop


def record(path: object, filename: str, code: str, reason: str | None,
           **more: Any) -> dict[str, Any]:
    """One errors.jsonl line (``more``: fields beside the four, such as a video's frames)."""
    return {"path": str(path), "filename": filename, "code": str(code), "reason": reason,
            **more}
