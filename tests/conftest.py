"""Shared fixtures.

The backend under test: PostgreSQL and Redis when GRAFT_TEST_DATABASE_URL and GRAFT_TEST_BROKER_URL are
set (CI sets them), else the embedded default (SQLite and Celery's filesystem broker). Each test session
gets a fresh database (a new PostgreSQL database, or a new SQLite file) and its own broker queues, so
runs never see each other's rows or messages. Tests isolate themselves further by working in a project
of their own, which is also how the service isolates its users.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy.engine import make_url

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from graft.config import Settings

ADMIN_KEY = "graft_test_admin_" + secrets.token_hex(16)


@dataclass
class Backend:
    name: str  # "postgresql+redis" or "embedded"
    database_url: str | None
    broker_url: str | None


def _create_postgres_database(url: str) -> str:
    import psycopg

    parsed = make_url(url)
    name = f"graft_test_{secrets.token_hex(4)}"
    admin = parsed.set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(admin, autocommit=True) as connection:
        connection.execute(f'CREATE DATABASE "{name}"')
    return parsed.set(database=name).render_as_string(hide_password=False)


def _drop_postgres_database(url: str, original: str) -> None:
    import psycopg

    name = make_url(url).database
    admin = make_url(original).set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(admin, autocommit=True) as connection:
        connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def backend() -> Iterator[Backend]:
    database = os.environ.get("GRAFT_TEST_DATABASE_URL")
    broker = os.environ.get("GRAFT_TEST_BROKER_URL")
    if database and broker:
        url = _create_postgres_database(database)
        try:
            yield Backend("postgresql+redis", url, broker)
        finally:
            _drop_postgres_database(url, database)
    else:
        yield Backend("embedded", None, None)


@pytest.fixture(scope="session")
def graft_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("graft-home")


def make_settings(backend: Backend, home: Path, **overrides: object) -> Settings:
    values: dict[str, object] = {
        "home": home,
        "database_url": backend.database_url or f"sqlite:///{home / 'graft.db'}",
        "broker_url": backend.broker_url,
        "bootstrap_api_key": ADMIN_KEY,
        # A queue no worker of another run consumes.
        "worker_queue": f"test-{secrets.token_hex(4)}",
        # Tests poll fast with few keys; the limit has tests of its own (test_security.py).
        "rate_limit_per_minute": 0,
    }
    values.update(overrides)
    return Settings(**values)  # type: ignore[arg-type]


@pytest.fixture(scope="session")
def settings(backend: Backend, graft_home: Path) -> Iterator[Settings]:
    from app.cli import prestart

    settings = make_settings(backend, graft_home)
    prestart(settings)
    yield settings
    if backend.broker_url:
        import redis

        client = redis.Redis.from_url(backend.broker_url)
        client.delete(settings.worker_queue)
        client.close()
