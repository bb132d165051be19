"""pretag client: the Python API (sync and asyncio) and ``pretag run``."""

from pretag.client.api import (
    AsyncClient,
    Client,
    Connection,
    DeadlineExceeded,
    InvalidImage,
    Overloaded,
    Prediction,
    PretagError,
    ServerError,
    Unauthenticated,
    Unavailable,
    Unsupported,
)

__all__ = ["AsyncClient", "Client", "Connection", "DeadlineExceeded", "InvalidImage",
           "Overloaded", "Prediction", "PretagError", "ServerError", "Unauthenticated",
           "Unavailable", "Unsupported"]
