"""The API's async read path: one round trip per read, no thread hop on PostgreSQL.

Job-status polling and API-key lookups are most of what clients send. They run as single SQLAlchemy Core
statements (only the columns a response needs), compiled once per dialect:

- PostgreSQL: on an asyncpg pool, in the event loop. A prepared statement is one round trip; there is no
  BEGIN/COMMIT around it (autocommit) and no pre-ping (a connection the server dropped is retried once).
- SQLite (and any other database): in a thread of a small pool of its own, on a read-only (deferred)
  connection: WAL readers take no lock, so a read never waits for a writer.

Rows come back as dicts with the types the ORM would give (aware datetimes, decoded JSON, booleans).
A database that cannot be reached raises `DatabaseUnavailable`, which the API answers with 503.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Mapping
from typing import Any, Protocol, TypeAlias

import anyio
from sqlalchemy import Engine
from sqlalchemy.engine import make_url
from sqlalchemy.sql import Select

log = logging.getLogger("graft.reads")

# A SELECT of any columns (SQLAlchemy 2.1 types a Select by its column types).
Statement: TypeAlias = "Select[Any, *tuple[Any, ...]]"

# Seconds a statement may run, and a pool connection may be waited for, before the read answers 503.
STATEMENT_TIMEOUT_SECONDS = 10.0
ACQUIRE_TIMEOUT_SECONDS = 30.0


class DatabaseUnavailable(Exception):
    """The database could not be reached (or did not answer in time) for a read."""


class Reader(Protocol):
    async def one(self, stmt: Statement, params: Mapping[str, Any]) -> dict[str, Any] | None: ...

    async def all(self, stmt: Statement, params: Mapping[str, Any]) -> list[dict[str, Any]]: ...

    async def close(self) -> None: ...


class _Compiled:
    __slots__ = ("names", "sql")

    def __init__(self, sql: str, names: list[str]) -> None:
        self.sql = sql
        self.names = names


class PostgresReader:
    """Reads on an asyncpg pool. Connections are made on demand, so the API starts while PostgreSQL is
    down and recovers by itself once it is back."""

    def __init__(self, url: str, *, max_size: int) -> None:
        parsed = make_url(url)
        self.dsn = parsed.set(drivername="postgresql").render_as_string(hide_password=False)
        self.max_size = max_size
        self._pool: Any = None
        self._pool_lock = asyncio.Lock()
        self._slots = asyncio.Semaphore(max_size)
        self._compiled: dict[int, _Compiled] = {}
        from sqlalchemy.dialects.postgresql import asyncpg as asyncpg_dialect

        self._dialect = asyncpg_dialect.dialect()

    async def _get_pool(self) -> Any:
        if self._pool is not None:
            return self._pool
        async with self._pool_lock:
            if self._pool is None:
                import asyncpg

                async def init(connection: Any) -> None:
                    for name in ("json", "jsonb"):
                        await connection.set_type_codec(
                            name, encoder=json.dumps, decoder=json.loads, schema="pg_catalog"
                        )

                async def reset(_connection: Any) -> None:
                    # These connections only ever run single SELECTs: no session state (locks, cursors,
                    # LISTEN, SET) to clear, so no reset round trip when one goes back to the pool.
                    return None

                self._pool = await asyncpg.create_pool(
                    self.dsn,
                    min_size=0,
                    max_size=self.max_size,
                    init=init,
                    reset=reset,
                    command_timeout=STATEMENT_TIMEOUT_SECONDS,
                    timeout=STATEMENT_TIMEOUT_SECONDS,  # connecting
                )
            return self._pool

    def _compile(self, stmt: Statement) -> _Compiled:
        # Statements are module-level constants: their identity is a stable cache key.
        key = id(stmt)
        compiled = self._compiled.get(key)
        if compiled is None:
            result = stmt.compile(dialect=self._dialect)
            compiled = _Compiled(str(result), list(result.positiontup or []))
            if len(self._compiled) > 256:  # statements built on the fly would otherwise pile up
                self._compiled.clear()
            self._compiled[key] = compiled
        return compiled

    async def _fetch(self, stmt: Statement, params: Mapping[str, Any]) -> list[Any]:
        import asyncpg

        compiled = self._compile(stmt)
        args = [params[name] for name in compiled.names]
        for attempt in (1, 2):
            try:
                pool = await self._get_pool()
                # Waiting for a connection in turn: asyncpg's own pool lets a newcomer take a connection
                # that was just released ahead of those already waiting, and under load some requests
                # waited many times longer than the rest (a p99 four times the median). This semaphore
                # hands a free connection to the longest waiter, so the pool itself never waits.
                async with asyncio.timeout(ACQUIRE_TIMEOUT_SECONDS):
                    await self._slots.acquire()
                try:
                    async with pool.acquire() as connection:
                        return list(await connection.fetch(compiled.sql, *args))
                finally:
                    self._slots.release()
            except (
                OSError,
                asyncpg.PostgresConnectionError,
                asyncpg.InterfaceError,
                asyncpg.exceptions.OperatorInterventionError,  # shutting down, starting up
            ) as exc:
                # A connection the server (or a network cut) dropped: the pool discards it; one retry on
                # a fresh connection tells a dropped connection from a database that is down.
                if attempt == 2:
                    log.warning("database unreachable for a read: %s", type(exc).__name__)
                    raise DatabaseUnavailable(str(exc)) from exc
            except (TimeoutError, asyncpg.TooManyConnectionsError) as exc:
                log.warning("database did not answer a read in time: %s", type(exc).__name__)
                raise DatabaseUnavailable(str(exc)) from exc
        raise AssertionError("not reached")

    async def one(self, stmt: Statement, params: Mapping[str, Any]) -> dict[str, Any] | None:
        rows = await self._fetch(stmt, params)
        return dict(rows[0]) if rows else None

    async def all(self, stmt: Statement, params: Mapping[str, Any]) -> list[dict[str, Any]]:
        return [dict(row) for row in await self._fetch(stmt, params)]

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()
            self._pool = None


class ThreadedReader:
    """Reads through SQLAlchemy Core (its type processing) in threads of their own; on SQLite on deferred
    connections, which hold no lock. They never take a thread the rest of the API needs."""

    def __init__(self, engine: Engine, *, max_threads: int) -> None:
        from graft.db import READ_ONLY

        self.engine = engine.execution_options(**{READ_ONLY: True})
        self.limiter = anyio.CapacityLimiter(max_threads)

    def _run(self, stmt: Statement, params: Mapping[str, Any]) -> list[dict[str, Any]]:
        with self.engine.connect() as connection:
            rows = [dict(row) for row in connection.execute(stmt, dict(params)).mappings()]
            connection.rollback()
            return rows

    async def one(self, stmt: Statement, params: Mapping[str, Any]) -> dict[str, Any] | None:
        rows = await anyio.to_thread.run_sync(self._run, stmt, params, limiter=self.limiter)
        return rows[0] if rows else None

    async def all(self, stmt: Statement, params: Mapping[str, Any]) -> list[dict[str, Any]]:
        return await anyio.to_thread.run_sync(self._run, stmt, params, limiter=self.limiter)

    async def close(self) -> None:
        return None


def make_reader(url: str, engine: Engine, *, pool_size: int) -> Reader:
    if url.startswith("postgresql"):
        return PostgresReader(url, max_size=pool_size)
    return ThreadedReader(engine, max_threads=pool_size)
