"""Durable jobs on the real database with the real runner (in threads of this process): leases and
fencing, duplicate deliveries, the reaper, resuming from the journal, graceful release, and the API's 503
while the database is unreachable. The same promises with real worker processes: tests/faults/."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select, update

from app.jobs.reaper import reap
from app.main import create_app
from graft import job_store
from graft.config import Settings
from graft.db import make_engine, make_session_factory, session_scope
from graft.ids import utcnow
from graft.queueing import JobQueue
from graft.tables import Job
from tests.conftest import ADMIN_KEY
from tests.helpers import Api, digits_table_csv, wait_for
from tests.integration.conftest import run_in_process


@pytest.fixture(scope="module")
def db(settings: Settings) -> Iterator[Any]:
    engine = make_engine(settings.effective_database_url)
    yield make_session_factory(engine)
    engine.dispose()


@pytest.fixture(scope="module")
def worker_settings(settings: Settings) -> Settings:
    return settings.model_copy(update={"cancel_poll_seconds": 0.05, "heartbeat_seconds": 0.5})


@pytest.fixture(scope="module")
def digits_dataset(client: TestClient) -> tuple[Api, str]:
    from tests.helpers import new_project

    api = new_project(Api(client, ADMIN_KEY))
    table = digits_table_csv(range(10), 600)
    dataset = api.upload_ok(table, "digits.csv", "tabular_classification", label_column="digit")
    return api, dataset["id"]


EPOCHS = 16  # a few seconds of training: long enough to interrupt


def long_job(api: Api, dataset: str, epochs: int = 12) -> str:
    body = {
        "base_model": "mlp",
        "training_dataset": dataset,
        "seed": 7,
        "hyperparameters": {"epochs": epochs, "batch_size": 8, "early_stopping": None},
    }
    response = api.create_job(body)
    assert response.status_code == 201, response.text
    return response.json()["id"]  # type: ignore[no-any-return]


def job_row(db: Any, job_id: str) -> Job:
    with session_scope(db) as session:
        job = session.scalar(select(Job).where(Job.id == job_id))
        assert job is not None
        session.expunge(job)
        return job


def in_thread(settings: Settings, job_id: str) -> threading.Thread:
    thread = threading.Thread(target=run_in_process, args=(settings, job_id), daemon=True)
    thread.start()
    return thread


def epoch_of(db: Any, job_id: str) -> int:
    progress = job_row(db, job_id).progress or {}
    return int(progress.get("epoch", 0))


def metrics_epochs(api: Api, job_id: str) -> list[int]:
    events = api.get(f"/v1/jobs/{job_id}/events", params={"limit": 100}).json()["data"]
    return [int(e["data"]["epoch"]) for e in events if e["type"] == "metrics"]


def messages(api: Api, job_id: str) -> list[str]:
    events = api.get(f"/v1/jobs/{job_id}/events", params={"limit": 100}).json()["data"]
    return [e["message"] for e in events]


def test_a_second_delivery_of_a_running_job_does_nothing(
    digits_dataset: tuple[Api, str], worker_settings: Settings, db: Any
) -> None:
    api, dataset = digits_dataset
    job_id = long_job(api, dataset, epochs=20)
    thread = in_thread(worker_settings, job_id)
    wait_for(lambda: job_row(db, job_id).status == "running", 60, message="the job to start")
    token = job_row(db, job_id).lease_token
    run_in_process(worker_settings, job_id)  # the duplicate: returns at once
    assert job_row(db, job_id).lease_token == token
    thread.join(120)
    job = job_row(db, job_id)
    assert job.status == "succeeded" and job.attempts == 1
    assert sum(m.startswith("Job started") for m in messages(api, job_id)) == 1
    run_in_process(worker_settings, job_id)  # and after it finished
    assert job_row(db, job_id).attempts == 1


@pytest.fixture(scope="module")
def uninterrupted(digits_dataset: tuple[Api, str], worker_settings: Settings, db: Any) -> dict[str, Any]:
    """The metrics of a long job that nothing interrupts, to compare interrupted ones with."""
    api, dataset = digits_dataset
    reference = long_job(api, dataset, epochs=EPOCHS)
    run_in_process(worker_settings, reference)
    return job_row(db, reference).metrics or {}


def running_job(
    digits_dataset: tuple[Api, str], worker_settings: Settings, db: Any, epoch: int
) -> tuple[str, threading.Thread]:
    """A long job running in a worker thread, past `epoch`."""
    api, dataset = digits_dataset
    job_id = long_job(api, dataset, epochs=EPOCHS)
    thread = in_thread(worker_settings, job_id)
    wait_for(lambda: epoch_of(db, job_id) >= epoch, 120, message=f"epoch {epoch}")
    return job_id, thread


def test_a_worker_that_lost_its_lease_stops_writing_and_the_job_resumes_elsewhere(
    digits_dataset: tuple[Api, str],
    worker_settings: Settings,
    settings: Settings,
    db: Any,
    uninterrupted: dict[str, Any],
) -> None:
    api, _ = digits_dataset
    job_id, thread = running_job(digits_dataset, worker_settings, db, 3)
    # The worker goes silent (as if its machine were cut off): the job's row is locked, so its writes wait,
    # and its heartbeat is old when the reaper looks.
    with session_scope(db) as session:
        session.execute(select(Job.id).where(Job.id == job_id).with_for_update())
        session.execute(
            update(Job).where(Job.id == job_id).values(heartbeat_at=utcnow() - timedelta(hours=1))
        )
        result = reap(session, settings, JobQueue(settings))
    assert result.requeued == [job_id]
    thread.join(60)
    assert not thread.is_alive()
    job = job_row(db, job_id)
    assert job.status == "queued" and job.lease_owner is None and job.resume_state
    requeued_at = len(messages(api, job_id))
    assert "stopped answering" in messages(api, job_id)[-1]

    run_in_process(worker_settings, job_id)
    job = job_row(db, job_id)
    assert job.status == "succeeded", job.error
    assert job.attempts == 2
    # The training state served its purpose: gone with the job's end.
    assert job.resume_state is None
    assert not (settings.storage_dir / "checkpoints" / job_id / "state").exists()
    # One clean history: every epoch once, in order, whatever the first worker had written.
    assert metrics_epochs(api, job_id) == list(range(1, EPOCHS + 1))
    checkpoints = api.get(f"/v1/jobs/{job_id}/checkpoints", params={"limit": 100}).json()["data"]
    assert sorted(c["epoch"] for c in checkpoints) == list(range(1, EPOCHS + 1))
    later = messages(api, job_id)[requeued_at:]
    assert any(m.startswith("Resumed from the training state saved after epoch") for m in later)
    # The same result as the run nobody interrupted.
    found = job.metrics or {}
    assert found["val_accuracy"] == pytest.approx(uninterrupted["val_accuracy"], abs=1e-6)
    assert found["val_loss"] == pytest.approx(uninterrupted["val_loss"], rel=1e-5)


def test_the_reaper_gives_up_after_max_attempts(
    digits_dataset: tuple[Api, str], settings: Settings, db: Any
) -> None:
    api, dataset = digits_dataset
    job_id = long_job(api, dataset)
    with session_scope(db) as session:
        token = job_store.claim(session, job_id, "gone-host:1/2")
        assert token is not None
        session.execute(
            update(Job)
            .where(Job.id == job_id)
            .values(worker_losses=settings.max_attempts - 1, heartbeat_at=utcnow() - timedelta(hours=1))
        )
    with session_scope(db) as session:
        result = reap(session, settings, JobQueue(settings))
    assert result.failed == [job_id]
    job = api.get(f"/v1/jobs/{job_id}").json()
    assert job["status"] == "failed"
    assert job["error"]["code"] == "worker_lost"
    assert f"lost its worker {settings.max_attempts} times" in job["error"]["message"]
    # A worker that comes back late cannot bring it back to life.
    with session_scope(db) as session:
        assert not job_store.renew(session, job_id, token)


def test_a_released_job_saves_its_state_goes_back_to_the_queue_and_finishes_the_same(
    digits_dataset: tuple[Api, str], worker_settings: Settings, db: Any, uninterrupted: dict[str, Any]
) -> None:
    api, _ = digits_dataset
    job_id, thread = running_job(digits_dataset, worker_settings, db, 2)
    with session_scope(db) as session:
        owner = job_row(db, job_id).lease_owner
        assert owner is not None
        assert job_store.request_release(session, owner.rsplit("/", 1)[0] + "/") == [job_id]
    thread.join(60)
    job = job_row(db, job_id)
    assert job.status == "queued", job.status
    entry = next(iter((job.resume_state or {}).values()))
    assert entry["batch"] > 0  # saved in the middle of an epoch, not at its start
    assert "resumes from its saved state" in messages(api, job_id)[-1]

    run_in_process(worker_settings, job_id)
    job = job_row(db, job_id)
    assert job.status == "succeeded"
    assert job.attempts == 2 and job.worker_losses == 0  # a graceful release is not a lost worker
    assert metrics_epochs(api, job_id) == list(range(1, EPOCHS + 1))
    assert job.metrics == pytest.approx(uninterrupted, rel=1e-5)


def test_cancel_reaches_a_job_through_the_database(
    digits_dataset: tuple[Api, str], worker_settings: Settings, db: Any
) -> None:
    api, dataset = digits_dataset
    job_id = long_job(api, dataset, epochs=30)
    thread = in_thread(worker_settings, job_id)
    wait_for(lambda: epoch_of(db, job_id) >= 1, 60, message="epoch 1")
    assert api.post(f"/v1/jobs/{job_id}/cancel").status_code == 200
    thread.join(60)
    assert job_row(db, job_id).status == "cancelled"


def test_queued_jobs_whose_message_was_lost_are_sent_again(
    digits_dataset: tuple[Api, str], settings: Settings, db: Any
) -> None:
    api, dataset = digits_dataset
    queue = JobQueue(settings)
    job_id = long_job(api, dataset)
    old = utcnow() - timedelta(seconds=settings.redispatch_seconds + 1)
    with session_scope(db) as session:
        session.execute(update(Job).where(Job.id == job_id).values(dispatched_at=old))

    class EmptyBroker:
        """The broker after a restart without persistence: its queue is empty."""

        sent: list[str] = []

        def pending(self) -> int:
            return 0

        def send(self, job_id: str) -> bool:
            self.sent.append(job_id)
            return queue.send(job_id)

    broker = EmptyBroker()
    with session_scope(db) as session:
        result = reap(session, settings, broker)
    assert job_id in result.redispatched and job_id in broker.sent
    assert queue.pending() is not None and queue.pending() >= 1  # type: ignore[operator]
    # Sent again only after another redispatch period.
    with session_scope(db) as session:
        assert job_id not in reap(session, settings, broker).redispatched


def test_the_api_answers_503_with_retry_after_while_the_database_is_down(settings: Settings) -> None:
    down = settings.model_copy(
        update={
            "database_url": "postgresql+psycopg://postgres@127.0.0.1:9/graft?connect_timeout=2",
            "reaper_interval_seconds": 0,
        }
    )
    with TestClient(create_app(down)) as client:
        response = client.get("/v1/jobs", headers={"Authorization": f"Bearer {ADMIN_KEY}"})
        assert response.status_code == 503
        assert response.headers["Retry-After"] == "5"
        assert response.json()["error"]["code"] == "database_unavailable"
        assert client.get("/healthz").status_code == 200  # the process itself is alive
        assert client.get("/readyz").status_code == 503


def test_training_states_of_jobs_that_ended_elsewhere_are_removed(
    digits_dataset: tuple[Api, str], settings: Settings, db: Any
) -> None:
    """A requeued job cancelled through the API (or failed by the reaper) ends without a worker to clear
    its training state: the reaper's sweep removes it."""
    from app.jobs.reaper import remove_finished_states
    from graft.storage import Storage

    api, dataset = digits_dataset
    job_id = long_job(api, dataset)
    storage = Storage(settings.storage_dir)
    state = storage.path(f"checkpoints/{job_id}/state/s.safetensors")
    state.parent.mkdir(parents=True)
    state.write_bytes(b"state")
    with session_scope(db) as session:
        session.execute(
            update(Job)
            .where(Job.id == job_id)
            .values(resume_state={"run": {"path": f"checkpoints/{job_id}/state/s.safetensors", "epoch": 2}})
        )
    assert api.post(f"/v1/jobs/{job_id}/cancel").json()["status"] == "cancelled"
    with session_scope(db) as session:
        assert job_id in remove_finished_states(session, storage)
    assert job_row(db, job_id).resume_state is None
    assert not state.parent.exists()
    with session_scope(db) as session:
        assert job_id not in remove_finished_states(session, storage)  # done once
