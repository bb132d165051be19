"""Reading a bearer-token file, for the server (--token-file) and the client alike."""

from __future__ import annotations

import logging
import stat
from pathlib import Path

log = logging.getLogger(__name__)


class TokenFileError(ValueError):
    """The token file cannot be used; the message says why."""


def read_token_file(path: Path) -> str:
    """The token in ``path`` (surrounding whitespace removed).

    Refuses a missing, unreadable, empty or multi-line file; warns when others
    than its owner may read it, as ssh does for keys.
    """
    try:
        mode = path.stat().st_mode
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise TokenFileError(f"cannot read token file {path}: {exc}") from None
    token = text.strip()
    if not token:
        raise TokenFileError(f"token file {path} is empty")
    if any(c.isspace() for c in token):
        raise TokenFileError(f"token file {path} holds more than one word; put the token "
                             f"alone in it")
    if mode & (stat.S_IRGRP | stat.S_IROTH):
        log.warning("token file %s can be read by other users (mode %s); chmod 600 it",
                    path, stat.filemode(mode))
    return token
