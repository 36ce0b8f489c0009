"""Locks that processes on one or many machines honour through the database they already share."""

from __future__ import annotations

import fcntl
import hashlib
import re
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import sqlalchemy

from pipelines.config import TEACHER_PARAMS, Config, teacher_members


def lockable(url: str) -> bool:
    """Whether ``database_lock`` can lock through this URL (a SQLite file or a PostgreSQL database)."""
    try:
        return sqlalchemy.engine.make_url(url).get_backend_name() in ("sqlite", "postgresql")
    except sqlalchemy.exc.ArgumentError:
        return False


@contextmanager
def database_lock(url: str, name: str, blocking: bool = True) -> Iterator[bool]:
    """An exclusive lock named ``name``: a file lock beside a SQLite database (processes of one machine), a
    session advisory lock in PostgreSQL (any machine; released by the server if the holder dies).
    Other URLs lock nothing. Yields whether this process holds the lock: always True when ``blocking`` (it waits
    for it); without, False at once when another holder has it (the block then runs without the lock: check)."""
    parsed = sqlalchemy.engine.make_url(url)
    if parsed.get_backend_name() == "sqlite":
        database = Path(parsed.database or "sqlite").resolve()
        safe_name = re.sub(r"[^\w.-]", "-", name)
        path = database.with_name(f".{database.name}.{safe_name}.lock")
        with open(path, "w") as handle:
            try:
                fcntl.flock(
                    handle, fcntl.LOCK_EX if blocking else fcntl.LOCK_EX | fcntl.LOCK_NB
                )  # released by the kernel if the holder dies
                held = True
            except BlockingIOError:
                held = False
            try:
                yield held
            finally:
                if held:
                    fcntl.flock(handle, fcntl.LOCK_UN)
    elif parsed.get_backend_name() == "postgresql":
        key = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)
        engine = sqlalchemy.create_engine(url)
        with engine.connect() as connection:
            if blocking:
                connection.execute(sqlalchemy.text("SELECT pg_advisory_lock(:key)"), {"key": key})
                held = True
            else:
                held = bool(connection.execute(sqlalchemy.text("SELECT pg_try_advisory_lock(:key)"), {"key": key}).scalar())
            try:
                yield held
            finally:
                if held:
                    connection.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:key)"), {"key": key})
        engine.dispose()
    else:
        yield True


@contextmanager
def teacher_lock(cfg: Config) -> Iterator[None]:
    """Held while the teachers are found or trained: distill runs, search and comparison workers started together train
    each teacher once, the others wait and then reuse the finished teacher run. One lock per teacher (its parameters,
    imbalance ratio included), so workers train different teachers at once; an ensemble takes all its members' locks
    or none, so it never trains a member another worker is training and never holds one while it waits. Through the
    study's storage (``storage`` or $KD_STORAGE_URL), so with PostgreSQL it holds across machines."""
    from pipelines.tracking.runs import step_key  # MLflow's import, for the distill and search steps that use it anyway

    keys = {hashlib.sha256(step_key(member, TEACHER_PARAMS).encode()).hexdigest()[:16] for member in teacher_members(cfg)}
    names = sorted(f"{cfg.study_name}:teacher:{key}" for key in keys)
    while True:
        with ExitStack() as stack:
            busy = next((name for name in names if not stack.enter_context(database_lock(cfg.storage_url, name, blocking=False))), None)
            if busy is None:
                yield
                return
        # All or none: an ensemble that held one member's lock while it waited for another's would keep a worker
        # from training that member meanwhile. Wait for the busy one with nothing held, then try them all again.
        with database_lock(cfg.storage_url, busy):
            pass
