"""End-to-end: a real uvicorn and a real Celery worker process (not eager mode), driven over HTTP, on
the session's backend (PostgreSQL + Redis in CI, SQLite + filesystem broker otherwise)."""

from __future__ import annotations

import os
import secrets
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from app.cli import api_command, prestart, worker_command
from graft.config import Settings
from tests.conftest import ADMIN_KEY, Backend, make_settings
from tests.helpers import Api, free_port, log_tail, new_project, stop, wait_for


def settings_env(settings: Settings) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GRAFT_")}
    env.update(
        {
            "GRAFT_HOME": str(settings.home),
            "GRAFT_PORT": str(settings.port),
            "GRAFT_WORKER_QUEUE": settings.worker_queue,
            "GRAFT_CANCEL_POLL_SECONDS": "0.3",
            # Small enough that the tests see both ways an evaluation is answered.
            "GRAFT_EVALUATE_SYNC_MAX_EXAMPLES": "30",
            "GRAFT_RATE_LIMIT_PER_MINUTE": "0",
            "PYTHONUNBUFFERED": "1",
        }
    )
    if settings.database_url:
        env["GRAFT_DATABASE_URL"] = settings.database_url
    if settings.broker_url:
        env["GRAFT_BROKER_URL"] = settings.broker_url
    if settings.bootstrap_api_key:
        env["GRAFT_BOOTSTRAP_API_KEY"] = settings.bootstrap_api_key.get_secret_value()
    return env


@dataclass
class Stack:
    settings: Settings
    base_url: str
    http: httpx.Client
    api_log: Path
    worker_log: Path

    def project(self) -> Api:
        return new_project(Api(self.http, ADMIN_KEY))

    def logs(self) -> str:
        return f"--- api log ---\n{log_tail(self.api_log)}\n--- worker log ---\n{log_tail(self.worker_log)}"


@pytest.fixture(scope="session")
def stack(backend: Backend, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    home = tmp_path_factory.mktemp("e2e-home")
    settings = make_settings(backend, home, port=free_port(), worker_queue=f"e2e-{secrets.token_hex(4)}")
    prestart(settings)
    env = settings_env(settings)
    api_log, worker_log = home / "api.log", home / "worker.log"
    with api_log.open("wb") as api_out, worker_log.open("wb") as worker_out:
        api = subprocess.Popen(api_command(settings), env=env, stdout=api_out, stderr=subprocess.STDOUT)
        worker = subprocess.Popen(
            worker_command(settings), env=env, stdout=worker_out, stderr=subprocess.STDOUT
        )
    base_url = f"http://127.0.0.1:{settings.port}"
    http = httpx.Client(base_url=base_url, timeout=60)
    result = Stack(settings, base_url, http, api_log, worker_log)
    try:

        def ready() -> bool:
            assert api.poll() is None and worker.poll() is None, result.logs()
            try:
                return http.get("/readyz").status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(ready, 90, message="the API to be ready")
        wait_for(lambda: b"ready." in worker_log.read_bytes(), 90, message="the worker to be ready")
        yield result
    finally:
        http.close()
        stop(api)
        stop(worker, timeout=60)
        if backend.broker_url:
            import redis

            client = redis.Redis.from_url(backend.broker_url)
            client.delete(settings.worker_queue)
            client.close()
