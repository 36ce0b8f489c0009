"""Locks that processes on one or many machines honour through the database they already share."""

from __future__ import annotations

import fcntl
import hashlib
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import sqlalchemy

if TYPE_CHECKING:
    from pipelines.config import Config


def lockable(url: str) -> bool:
    """Whether ``database_lock`` can lock through this URL (a SQLite file or a PostgreSQL database)."""
    try:
        return sqlalchemy.engine.make_url(url).get_backend_name() in ("sqlite", "postgresql")
    except sqlalchemy.exc.ArgumentError:
        return False


@contextmanager
def database_lock(url: str, name: str) -> Iterator[None]:
    """An exclusive lock named ``name``: a file lock beside a SQLite database (processes of one machine), a
    session advisory lock in PostgreSQL (any machine; released by the server if the holder dies).
    Other URLs lock nothing."""
    parsed = sqlalchemy.engine.make_url(url)
    if parsed.get_backend_name() == "sqlite":
        database = Path(parsed.database or "sqlite").resolve()
        safe_name = re.sub(r"[^\w.-]", "-", name)
        path = database.with_name(f".{database.name}.{safe_name}.lock")
        with open(path, "w") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)  # released by the kernel if the holder dies
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)
    elif parsed.get_backend_name() == "postgresql":
        key = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)
        engine = sqlalchemy.create_engine(url)
        with engine.connect() as connection:
            connection.execute(sqlalchemy.text("SELECT pg_advisory_lock(:key)"), {"key": key})
            try:
                yield
            finally:
                connection.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:key)"), {"key": key})
        engine.dispose()
    else:
        yield


def teacher_lock(cfg: Config):
    """Held while the teachers are found or trained: distill runs and search workers started together train them
    once, the others wait and then reuse the finished teacher run. Through the study's storage (``storage`` or
    $KD_STORAGE_URL), so with PostgreSQL it holds across machines."""
    return database_lock(cfg.storage_url, f"{cfg.study_name}:teacher")
