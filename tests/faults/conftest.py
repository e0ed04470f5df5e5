"""The fault-injection suite's cluster: a real uvicorn API and real Celery worker processes on PostgreSQL and
Redis (the machine's own, each behind a TCP proxy the tests can cut), with short leases so that faults play
out in seconds. Workers are started and killed by the tests themselves.

PostgreSQL and Redis are needed here whatever backend the rest of the suite uses: GRAFT_TEST_DATABASE_URL
and GRAFT_TEST_BROKER_URL when set, else the defaults on 127.0.0.1.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy.engine import make_url

from app.cli import api_command, prestart, worker_command
from graft.config import Settings
from tests.conftest import ADMIN_KEY, _create_postgres_database, _drop_postgres_database
from tests.e2e.conftest import free_port, log_tail, settings_env, stop
from tests.faults.proxy import Proxy
from tests.helpers import Api, digits_table_csv, new_project, wait_for

DEFAULT_DATABASE = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
DEFAULT_BROKER = "redis://127.0.0.1:6379/0"

# Short enough that each fault plays out in seconds.
FAULT_SETTINGS = {
    "GRAFT_HEARTBEAT_SECONDS": "0.5",
    "GRAFT_LEASE_SECONDS": "4",
    "GRAFT_REAPER_INTERVAL_SECONDS": "0.5",
    "GRAFT_REDISPATCH_SECONDS": "3",
    "GRAFT_MAX_ATTEMPTS": "3",
    "GRAFT_CANCEL_POLL_SECONDS": "0.2",
    "GRAFT_DB_RETRY_SECONDS": "120",
    "GRAFT_TORCH_THREADS": "1",
}


@dataclass
class Worker:
    name: str
    process: subprocess.Popen[bytes]
    log: Path

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def kill(self) -> None:
        """kill -9 of the worker and its pool processes, as when its machine dies."""
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(10)

    def terminate(self) -> None:
        """SIGTERM to the worker's main process, as `docker stop` or Kubernetes send it."""
        self.process.send_signal(signal.SIGTERM)


@dataclass
class Cluster:
    settings: Settings
    env: dict[str, str]
    home: Path
    http: httpx.Client
    api_log: Path
    database: Proxy
    broker: Proxy
    broker_url: str  # the real Redis, not through the proxy
    workers: list[Worker] = field(default_factory=list)

    def start_worker(self) -> Worker:
        name = f"worker{len(self.workers) + 1}"
        log = self.home / f"{name}.log"
        with log.open("wb") as out:
            command = [*worker_command(self.settings)]
            command[command.index("--hostname") + 1] = f"{name}@%h"
            process = subprocess.Popen(
                command, env=self.env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        worker = Worker(name, process, log)
        self.workers.append(worker)
        wait_for(
            lambda: "ready." in worker.text() or process.poll() is not None,
            120,
            message=f"{name} to be ready",
        )
        assert process.poll() is None, worker.text()
        return worker

    def stop_workers(self) -> None:
        for worker in self.workers:
            if worker.process.poll() is None:
                os.killpg(worker.process.pid, signal.SIGKILL)
                worker.process.wait(10)
        self.workers.clear()

    def project(self) -> Api:
        return new_project(Api(self.http, ADMIN_KEY))

    def logs(self) -> str:
        parts = [f"--- api ---\n{log_tail(self.api_log)}"]
        parts += [f"--- {w.name} ---\n{log_tail(w.log)}" for w in self.workers]
        return "\n".join(parts)


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    database = os.environ.get("GRAFT_TEST_DATABASE_URL", DEFAULT_DATABASE)
    broker = os.environ.get("GRAFT_TEST_BROKER_URL", DEFAULT_BROKER)
    database_url = _create_postgres_database(database)
    parsed_db, parsed_broker = make_url(database_url), make_url(broker)
    database_proxy = Proxy(parsed_db.host or "127.0.0.1", parsed_db.port or 5432)
    broker_proxy = Proxy(parsed_broker.host or "127.0.0.1", parsed_broker.port or 6379)
    home = tmp_path_factory.mktemp("faults-home")
    settings = Settings(
        home=home,
        port=free_port(),
        database_url=parsed_db.set(host="127.0.0.1", port=database_proxy.port).render_as_string(
            hide_password=False
        ),
        broker_url=parsed_broker.set(host="127.0.0.1", port=broker_proxy.port).render_as_string(
            hide_password=False
        ),
        bootstrap_api_key=ADMIN_KEY,  # type: ignore[arg-type]
        worker_queue=f"faults-{secrets.token_hex(4)}",
    )
    prestart(settings)
    env = {**settings_env(settings), **FAULT_SETTINGS}
    api_log = home / "api.log"
    with api_log.open("wb") as out:
        api = subprocess.Popen(api_command(settings), env=env, stdout=out, stderr=subprocess.STDOUT)
    http = httpx.Client(base_url=f"http://127.0.0.1:{settings.port}", timeout=30)
    result = Cluster(settings, env, home, http, api_log, database_proxy, broker_proxy, broker)
    try:

        def ready() -> bool:
            assert api.poll() is None, log_tail(api_log)
            try:
                return http.get("/readyz").status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(ready, 90, message="the API to be ready")
        yield result
    finally:
        result.stop_workers()
        http.close()
        stop(api)
        database_proxy.cut()
        broker_proxy.cut()
        import redis

        client = redis.Redis.from_url(broker)
        client.delete(settings.worker_queue)
        client.close()
        _drop_postgres_database(database_url, database)


@pytest.fixture
def faults(cluster: Cluster) -> Iterator[Cluster]:
    """The cluster, with every worker a test started killed afterwards and both proxies open again."""
    try:
        yield cluster
    finally:
        cluster.stop_workers()
        if cluster.database._listener is None:
            cluster.database.restore()
        if cluster.broker._listener is None:
            cluster.broker.restore()


@pytest.fixture(scope="session")
def digits_table() -> bytes:
    return digits_table_csv(range(10), 600)


def start_job(api: Api, table: bytes, epochs: int, **hp: Any) -> str:
    dataset = api.upload_ok(table, "digits.csv", "tabular_classification", label_column="digit")
    body = {
        "base_model": "mlp",
        "training_dataset": dataset["id"],
        "seed": 7,
        "hyperparameters": {"epochs": epochs, "batch_size": 8, "early_stopping": None, **hp},
    }
    response = api.create_job(body)
    assert response.status_code == 201, response.text
    return response.json()["id"]  # type: ignore[no-any-return]
