"""Engine and session factory. Sessions commit only at the edge: the request dependency or a worker's
session scope."""

from __future__ import annotations

import functools
import json
import logging
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import anyio
from sqlalchemy import Engine, MetaData, create_engine, event, text
from sqlalchemy.orm import DeclarativeBase, Session, sessionmaker

# Stable constraint names so that Alembic migrations are reproducible on SQLite and PostgreSQL.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    # WAL lets the API read while a worker writes progress; busy_timeout waits out short write locks.
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


def _sqlite_takes_control(dbapi_connection: Any, _record: Any) -> None:
    # pysqlite opens transactions lazily and commits on SAVEPOINT release; SQLAlchemy issues BEGIN itself.
    dbapi_connection.isolation_level = None


READ_ONLY = "graft_read_only"


def _sqlite_begin(connection: Any) -> None:
    # A unit of work that may write takes the write lock up front (IMMEDIATE): a transaction that reads,
    # then writes, never fails on a snapshot another process (API or worker) changed in between, and
    # busy_timeout makes the others wait. Read-only units take no lock at all: in WAL mode a reader never
    # waits for a writer, nor a writer for a reader.
    if connection.get_execution_options().get(READ_ONLY):
        connection.exec_driver_sql("BEGIN DEFERRED")
    else:
        connection.exec_driver_sql("BEGIN IMMEDIATE")


def finite_json(value: Any) -> str:
    """What the JSON columns store: standard JSON, with NaN and the infinities as null. PostgreSQL's JSONB
    refuses them (the write fails) and SQLite would store a `NaN` that no client's JSON parser reads; a
    metric that is not a number is better stored as no number."""
    try:
        return json.dumps(value, allow_nan=False)
    except ValueError:
        return json.dumps(_finite(value), allow_nan=False)


def _finite(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(item) for item in value]
    return value


def make_engine(url: str, *, pool_size: int = 5) -> Engine:
    if url.startswith("sqlite"):
        engine = create_engine(
            url, connect_args={"check_same_thread": False, "timeout": 30}, json_serializer=finite_json
        )
        event.listen(engine, "connect", _sqlite_takes_control)
        event.listen(engine, "connect", _sqlite_pragmas)
        event.listen(engine, "begin", _sqlite_begin)
        return engine
    return create_engine(
        url, pool_pre_ping=True, pool_size=pool_size, max_overflow=pool_size, json_serializer=finite_json
    )


def make_session_factory(engine: Engine, *, read_only: bool = False) -> sessionmaker[Session]:
    """Sessions for units of work; `read_only` ones never take SQLite's write lock (and must not write)."""
    bind = engine.execution_options(**{READ_ONLY: True}) if read_only else engine
    return sessionmaker(bind=bind, expire_on_commit=False, autoflush=False)


log = logging.getLogger("graft.db")
T = TypeVar("T")


def after_commit(session: Session, callback: Callable[[], object]) -> None:
    """Run `callback` once this unit of work has committed (enqueue a job only when its row exists)."""
    session.info.setdefault("after_commit", []).append(callback)


def after_rollback(session: Session, callback: Callable[[], object]) -> None:
    """Run `callback` if this unit of work fails (remove a file written for a row that never landed)."""
    session.info.setdefault("after_rollback", []).append(callback)


def _run_hooks(session: Session, name: str) -> None:
    for callback in session.info.pop(name, []):
        try:
            callback()
        except Exception:
            log.exception("%s hook failed", name)
    session.info.pop("after_commit", None)
    session.info.pop("after_rollback", None)


def commit(session: Session) -> None:
    """Commit, then run the after-commit hooks; on failure roll back and run the rollback hooks."""
    try:
        session.commit()
    except BaseException:
        rollback(session)
        raise
    _run_hooks(session, "after_commit")


def rollback(session: Session) -> None:
    session.rollback()
    _run_hooks(session, "after_rollback")


@contextmanager
def session_scope(factory: sessionmaker[Session]) -> Iterator[Session]:
    """One unit of work: commit on success, roll back on any error."""
    session = factory()
    try:
        yield session
    except BaseException:
        rollback(session)
        raise
    else:
        commit(session)
    finally:
        session.close()


def is_unreachable(exc: BaseException) -> bool:
    """A lost or refused database connection (worth retrying, or a 503), as opposed to a bad statement or
    a database that answers with an error (disk full, deadlock, timeout)."""
    from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError

    if not isinstance(exc, DBAPIError):
        return False
    if exc.connection_invalidated or isinstance(exc, InterfaceError):
        return True
    if not isinstance(exc, OperationalError):
        return False
    state = getattr(exc.orig, "sqlstate", None)
    if state is not None:  # PostgreSQL: connection exceptions, and the server shutting down
        return str(state).startswith("08") or state in ("57P01", "57P02", "57P03")
    # psycopg reports a refused connection without a state; SQLite reports a locked file as an
    # OperationalError too, which is contention, not an outage.
    return "locked" not in str(exc.orig)


def is_transient(exc: BaseException) -> bool:
    """Worth running the whole transaction again: the database is unreachable, or the transaction lost a
    race (a deadlock, a serialization failure, SQLite's lock still held after its busy timeout)."""
    from sqlalchemy.exc import OperationalError

    if is_unreachable(exc):
        return True
    if not isinstance(exc, OperationalError):
        return False
    state = getattr(exc.orig, "sqlstate", None)
    return state in ("40P01", "40001") or "database is locked" in str(exc.orig)


def ping(engine: Engine) -> None:
    with engine.connect() as connection:
        connection.execute(text("SELECT 1"))


class Database:
    """The API's units of work, each run whole in one thread hop: the session is opened, used, committed
    (with its after-commit hooks) and closed in the same thread, so a pooled connection is held only while
    its statements run and never while a request waits for a thread, a body or a model.

    `read` units never write and never take SQLite's write lock; `write` units take it for their few
    statements only. Long work (streaming, hashing, validation, inference) happens between units, never
    inside one.
    """

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.read_factory = make_session_factory(engine, read_only=True)
        self.write_factory = make_session_factory(engine)

    def read_sync(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        session = self.read_factory()
        try:
            result = fn(session, *args, **kwargs)
            if session.new or session.dirty or session.deleted:
                raise RuntimeError(f"{getattr(fn, '__name__', fn)} changed rows in a read-only unit of work")
            return result
        finally:
            session.close()  # objects stay usable (their state is loaded), the connection goes back

    def write_sync(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        with session_scope(self.write_factory) as session:
            return fn(session, *args, **kwargs)

    async def read(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return await anyio.to_thread.run_sync(functools.partial(self.read_sync, fn, *args, **kwargs))

    async def write(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return await anyio.to_thread.run_sync(functools.partial(self.write_sync, fn, *args, **kwargs))
