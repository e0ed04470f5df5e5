"""Faults injected into a running cluster (real API and worker processes, real PostgreSQL and Redis), and
the promises checked after each: nothing lost, nothing run twice at once, the final state right, one clean
history. docs/reliability.md describes each fault and what the system does."""

from __future__ import annotations

import time
from typing import Any

import httpx
import pytest

from graft.queueing import JobQueue
from tests.faults.conftest import Cluster, start_job
from tests.helpers import Api, wait_for

EPOCHS = 30  # some ten seconds of training in one worker process: long enough to interrupt


def job(api: Api, job_id: str) -> dict[str, Any]:
    return api.get(f"/v1/jobs/{job_id}").json()  # type: ignore[no-any-return]


def events(api: Api, job_id: str) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []
    after = None
    while True:
        params: dict[str, Any] = {"limit": 100, **({"after": after} if after else {})}
        page = api.get(f"/v1/jobs/{job_id}/events", params=params).json()
        found += page["data"]
        if not page["has_more"]:
            return found
        after = page["data"][-1]["id"]


def checkpoint_epochs(api: Api, job_id: str) -> list[int]:
    page = api.get(f"/v1/jobs/{job_id}/checkpoints", params={"limit": 100}).json()
    return sorted(c["epoch"] for c in page["data"])


def assert_one_clean_history(api: Api, job_id: str, epochs: int = EPOCHS) -> list[dict[str, Any]]:
    found = events(api, job_id)
    assert [int(e["data"]["epoch"]) for e in found if e["type"] == "metrics"] == list(range(1, epochs + 1))
    assert checkpoint_epochs(api, job_id) == list(range(1, epochs + 1))
    return found


def wait_epoch(cluster: Cluster, api: Api, job_id: str, epoch: int, timeout: float = 120) -> None:
    def reached() -> bool:
        found = job(api, job_id)
        assert found["status"] in ("queued", "running"), f"{found}\n{cluster.logs()}"
        return (found.get("progress") or {}).get("epoch", 0) >= epoch

    wait_for(reached, timeout, interval=0.1, message=f"epoch {epoch}")


def finished(cluster: Cluster, api: Api, job_id: str, timeout: float = 240) -> dict[str, Any]:
    try:
        found = api.wait_job(job_id, timeout=timeout)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{cluster.logs()}") from None
    return found


def test_kill_9_mid_epoch_the_job_resumes_on_a_new_worker_with_one_history(
    faults: Cluster, digits_table: bytes
) -> None:
    api = faults.project()
    first = faults.start_worker()
    reference = start_job(api, digits_table, EPOCHS)
    expected = finished(faults, api, reference)
    assert expected["status"] == "succeeded"

    job_id = start_job(api, digits_table, EPOCHS)
    wait_epoch(faults, api, job_id, 4)
    first.kill()
    # The heartbeat stops; the reaper (in the API) requeues the job once the lease expires.
    wait_for(lambda: job(api, job_id)["status"] == "queued", 30, message="the reaper to requeue the job")
    faults.start_worker()
    done = finished(faults, api, job_id)
    assert done["status"] == "succeeded", f"{done['error']}\n{faults.logs()}"
    assert done["attempts"] == 2
    history = assert_one_clean_history(api, job_id)
    messages = [e["message"] for e in history]
    assert any("stopped answering" in m for m in messages)
    assert any(m.startswith("Resumed from the training state saved after epoch") for m in messages)
    # The same model as the run nobody interrupted (training on the CPU is deterministic).
    assert done["metrics"]["val_accuracy"] == pytest.approx(expected["metrics"]["val_accuracy"], abs=1e-6)
    assert done["metrics"]["val_loss"] == pytest.approx(expected["metrics"]["val_loss"], rel=1e-5)


def test_sigterm_the_job_saves_its_state_and_goes_back_to_the_queue(
    faults: Cluster, digits_table: bytes
) -> None:
    api = faults.project()
    worker = faults.start_worker()
    job_id = start_job(api, digits_table, EPOCHS)
    wait_epoch(faults, api, job_id, 3)
    asked = time.monotonic()
    worker.terminate()
    worker.process.wait(30)  # the grace period: the worker exits once the job is back in the queue
    grace = time.monotonic() - asked
    requeued = job(api, job_id)
    assert requeued["status"] == "queued", f"{requeued}\n{faults.logs()}"
    assert "resumes from its saved state" in events(api, job_id)[-1]["message"]

    faults.start_worker()
    done = finished(faults, api, job_id)
    assert done["status"] == "succeeded", done["error"]
    assert done["attempts"] == 2
    resumed = [e for e in assert_one_clean_history(api, job_id) if (e["data"] or {}).get("resumed")]
    assert len(resumed) == 1 and resumed[0]["data"]["batch"] > 0, resumed  # mid-epoch
    print(f"SIGTERM to requeued and exited: {grace:.1f}s")


def test_a_job_delivered_twice_runs_once(faults: Cluster, digits_table: bytes) -> None:
    api = faults.project()
    faults.start_worker()
    second = faults.start_worker()
    job_id = start_job(api, digits_table, EPOCHS)
    wait_epoch(faults, api, job_id, 2)
    queue = JobQueue(faults.settings)
    assert queue.send(job_id) and queue.send(job_id)
    wait_for(
        lambda: "nothing to do for this delivery" in "".join(w.text() for w in faults.workers),
        60,
        message="a duplicate delivery to be dropped",
    )
    done = finished(faults, api, job_id)
    assert done["status"] == "succeeded" and done["attempts"] == 1
    history = assert_one_clean_history(api, job_id)
    assert sum(e["message"].startswith("Job started") for e in history) == 1
    assert second.process.poll() is None


def test_a_job_whose_worker_always_dies_fails_after_max_attempts(
    faults: Cluster, digits_table: bytes
) -> None:
    api = faults.project()
    job_id = start_job(api, digits_table, EPOCHS)
    for attempt in (1, 2, 3):
        worker = faults.start_worker()
        wait_for(
            lambda attempt=attempt: (
                job(api, job_id)["status"] == "running" and job(api, job_id)["attempts"] == attempt
            ),  # type: ignore[misc]
            60,
            message=f"attempt {attempt}",
        )
        worker.kill()
        faults.stop_workers()
        if attempt < 3:
            wait_for(lambda: job(api, job_id)["status"] == "queued", 30, message="the requeue")
    failed = api.wait_job(job_id, timeout=30)
    assert failed["status"] == "failed"
    assert failed["error"]["code"] == "worker_lost"
    assert "lost its worker 3 times" in failed["error"]["message"]
    # And it stays failed: a new worker does not pick it up again.
    faults.start_worker()
    time.sleep(3)
    assert job(api, job_id)["status"] == "failed" and job(api, job_id)["attempts"] == 3


def test_redis_restarted_without_its_data_workers_reconnect_and_lost_jobs_are_sent_again(
    faults: Cluster, digits_table: bytes
) -> None:
    import redis

    api = faults.project()
    worker = faults.start_worker()
    running = start_job(api, digits_table, EPOCHS)
    wait_epoch(faults, api, running, 2)
    waiting = start_job(api, digits_table, 5)  # its message waits in Redis behind the running job
    queue = JobQueue(faults.settings)
    wait_for(lambda: (queue.pending() or 0) >= 1, 10, message=f"the second job's message\n{faults.logs()}")
    faults.broker.cut()
    client = redis.Redis.from_url(faults.broker_url)
    client.delete(faults.settings.worker_queue)  # what a restart without persistence loses
    client.close()
    time.sleep(2)
    faults.broker.restore()
    assert finished(faults, api, running)["status"] == "succeeded"
    done = finished(faults, api, waiting)
    assert done["status"] == "succeeded", f"{done}\n{faults.logs()}"
    assert worker.process.poll() is None  # the same worker reconnected and consumed again
    assert "Connection to broker lost" in worker.text() or "Cannot connect" in worker.text()
    assert done["attempts"] == 1
    assert_one_clean_history(api, running)


def test_postgres_cut_mid_run_the_api_answers_503_and_everything_recovers(
    faults: Cluster, digits_table: bytes
) -> None:
    api = faults.project()
    faults.start_worker()
    job_id = start_job(api, digits_table, EPOCHS)
    wait_epoch(faults, api, job_id, 3)
    faults.database.cut()
    try:
        response = faults.http.get(f"/v1/jobs/{job_id}", headers={"Authorization": f"Bearer {api.key}"})
        assert response.status_code == 503, response.text
        assert response.headers["Retry-After"] == "5"
        assert response.json()["error"]["code"] == "database_unavailable"
        assert faults.http.get("/readyz").status_code == 503
        time.sleep(6)  # longer than a lease: the worker cannot renew it, the reaper cannot judge it
    finally:
        faults.database.restore()

    def answers() -> bool:
        try:
            return api.get(f"/v1/jobs/{job_id}").status_code == 200
        except httpx.HTTPError:
            return False

    wait_for(answers, 30, message="the API to recover by itself")
    done = finished(faults, api, job_id)
    assert done["status"] == "succeeded", f"{done['error']}\n{faults.logs()}"
    assert done["attempts"] == 1  # the worker waited for the database; nobody took the job from it
    assert_one_clean_history(api, job_id)
    worker_log = "".join(w.text() for w in faults.workers)
    assert "database unreachable" in worker_log or "heartbeat failed" in worker_log


def test_cancel_works_after_every_worker_was_restarted(faults: Cluster, digits_table: bytes) -> None:
    """Cancel is a flag in the database, not a message to the worker that received the job: it reaches a
    job whose worker is gone (the reaper cancels it) and a job resumed on a worker started since."""
    api = faults.project()
    # Jobs long enough that none can finish before its cancel arrives, on however fast a machine.
    worker = faults.start_worker()
    orphan = start_job(api, digits_table, 10 * EPOCHS)
    wait_epoch(faults, api, orphan, 2)
    worker.kill()  # every worker gone
    assert api.post(f"/v1/jobs/{orphan}/cancel").status_code == 200
    assert api.wait_job(orphan, timeout=30)["status"] == "cancelled"

    worker = faults.start_worker()
    moved = start_job(api, digits_table, 10 * EPOCHS)
    wait_epoch(faults, api, moved, 2)
    worker.terminate()  # the job goes back to the queue
    worker.process.wait(30)
    faults.start_worker()  # a new worker resumes it
    wait_for(
        lambda: job(api, moved)["status"] == "running" and job(api, moved)["attempts"] == 2,
        60,
        message="the job to resume on the new worker",
    )
    assert api.post(f"/v1/jobs/{moved}/cancel").status_code == 200
    cancelled = api.wait_job(moved, timeout=30)
    assert cancelled["status"] == "cancelled", cancelled
