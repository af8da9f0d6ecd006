"""An MLflow client that several processes can share one SQLite store with.

Two things go wrong when jobs (Hydra's joblib launcher, several shells, a SLURM array) write to
one SQLite file at once:

- creating a fresh store runs MLflow's schema migrations; two processes doing it together
  corrupt each other's migration (alembic "expected to match one row", duplicate tables).
  `open_client` serializes that first contact with a file lock next to the database.
- under heavy write contention SQLite answers "database is locked" once its busy timeout runs
  out. Such a write did not happen, so repeating it is safe: `RetryingClient` repeats any
  client call that failed that way, with growing pauses.

For several machines use a tracking server (`mlflow server`), not a shared SQLite file.
"""
from __future__ import annotations

import functools
import logging
import random
import time
from pathlib import Path
from typing import Any, Callable

log = logging.getLogger(__name__)

LOCKED_MESSAGES = ("database is locked", "database table is locked")
RETRIES = 8


def is_locked_error(exc: BaseException) -> bool:
    text = str(exc).lower()
    return any(m in text for m in LOCKED_MESSAGES)


def retry_locked(fn: Callable, retries: int = RETRIES, first_wait_s: float = 0.2) -> Callable:
    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        wait = first_wait_s
        for attempt in range(retries + 1):
            try:
                return fn(*args, **kwargs)
            except Exception as exc:  # noqa: BLE001 - MLflow wraps SQLAlchemy's error in its own types
                if attempt == retries or not is_locked_error(exc):
                    raise
                log.warning("tracking store busy (%s); retry %d/%d in %.1fs", fn.__name__, attempt + 1, retries, wait)
                time.sleep(wait * (1 + random.random()))
                wait = min(wait * 2, 5.0)
        raise AssertionError("unreachable")

    return call


class RetryingClient:
    """Wraps an MlflowClient: every method call is retried while the store says it is locked."""

    def __init__(self, client: Any) -> None:
        self._client = client

    def __getattr__(self, name: str) -> Any:
        # Unpickling (joblib/submitit send the launcher's callbacks to workers) looks attributes up
        # before __init__ has set _client: refuse those instead of recursing.
        if name.startswith("__") or name == "_client":
            raise AttributeError(name)
        attr = getattr(self._client, name)
        return retry_locked(attr) if callable(attr) else attr


def sqlite_path(uri: str) -> Path | None:
    if uri.startswith("sqlite:///"):
        return Path(uri[len("sqlite:///"):])
    return None


def open_client(uri: str, first_contact: Callable[[Any], Any]) -> tuple:
    """(client, first_contact(client)); for SQLite, both run under an inter-process lock."""
    from filelock import FileLock
    from mlflow.tracking import MlflowClient

    db = sqlite_path(uri)
    if db is None:
        client = RetryingClient(MlflowClient(tracking_uri=uri))
        return client, first_contact(client)
    with FileLock(str(db) + ".lock"):  # MlflowClient() itself creates and migrates the store
        client = RetryingClient(MlflowClient(tracking_uri=uri))
        return client, first_contact(client)
