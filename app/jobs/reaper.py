"""The reaper: jobs whose worker stopped answering go back to the queue, and lost broker messages are sent
again. It runs in every API process (a thread); the conditional updates it makes let any number of them
run side by side without two requeuing the same job.

- A running job whose lease has not been renewed for `lease_seconds` lost its worker (killed, out of
  memory, machine gone). It is queued again and resumes from its saved training state, or fails with
  `worker_lost` once it has lost `max_attempts` workers (graceful releases do not count).
- A queued job has a message in the broker, unless the broker lost it (Redis restarted without
  persistence, a send that failed). When the broker's queue is empty, queued jobs last sent more than
  `redispatch_seconds` ago are sent again; a second message for a job is harmless (the first delivery
  claims it, the other finds it taken).
- Right after the database was unreachable, leases are not judged: the workers could not renew them either.
- Resumable uploads that stopped growing `upload_expiry_seconds` ago are removed (app/uploads/service.py).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Protocol

from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, sessionmaker

from app.uploads.service import remove_abandoned
from graft import job_store
from graft.config import Settings
from graft.db import after_commit, session_scope
from graft.ids import utcnow
from graft.job_store import JobStatus
from graft.storage import Storage

log = logging.getLogger("graft.reaper")


class Sender(Protocol):
    def send(self, job_id: str) -> bool: ...

    def pending(self) -> int | None: ...


@dataclass
class ReapResult:
    requeued: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    redispatched: list[str] = field(default_factory=list)
    uploads_removed: list[str] = field(default_factory=list)


def reap(session: Session, settings: Settings, queue: Sender, *, judge_leases: bool = True) -> ReapResult:
    """One pass; the caller commits (messages are sent after the commit)."""
    result = ReapResult()
    now = utcnow()
    cutoff = job_store.database_time(session) - timedelta(seconds=settings.lease_seconds)
    for job in job_store.expired_leases(session, cutoff) if judge_leases else []:
        # Each change only if nothing changed since it was read: the same lease, still no fresh heartbeat.
        last_seen = job.heartbeat_at.isoformat(timespec="seconds") if job.heartbeat_at else "never"
        if job.cancel_requested:
            message = (
                f"Job cancelled (its worker stopped answering after the request; last heartbeat {last_seen})"
            )
            if job_store.end_lost(session, job, cutoff, JobStatus.CANCELLED, message):
                result.failed.append(job.id)
            continue
        # Graceful releases (a worker shutting down) do not count: only workers lost.
        losses = job.worker_losses + 1
        if losses >= settings.max_attempts:
            message = (
                f"The job lost its worker {losses} times (the last stopped answering at {last_seen}); "
                f"GRAFT_MAX_ATTEMPTS is {settings.max_attempts}, so it is not tried again"
            )
            error = {"code": "worker_lost", "message": message}
            if job_store.end_lost(
                session, job, cutoff, JobStatus.FAILED, message, worker_losses=losses, error=error
            ):
                result.failed.append(job.id)
            continue
        message = (
            f"The job's worker ({job.lease_owner}) stopped answering (last heartbeat {last_seen}); the job "
            f"was queued again (workers lost: {losses} of {settings.max_attempts} allowed)"
        )
        data = {"attempts": job.attempts, "worker_losses": losses, "worker": job.lease_owner}
        if job_store.requeue_lost(session, job, cutoff, message, data, losses):
            result.requeued.append(job.id)
    if queue.pending() == 0:
        stale = now - timedelta(seconds=settings.redispatch_seconds)
        for job_id in job_store.undispatched(session, stale):
            job_store.mark_dispatched(session, job_id, now)
            result.redispatched.append(job_id)
    for job_id in [*result.requeued, *result.redispatched]:
        after_commit(session, lambda job_id=job_id: queue.send(job_id))  # type: ignore[misc]
    if result.requeued or result.failed or result.redispatched:
        log.info(
            "reaper: requeued %s, failed %s, sent again %s",
            result.requeued,
            result.failed,
            result.redispatched,
        )
    return result


def remove_finished_states(session: Session, storage: Storage) -> list[str]:
    """Training states of jobs that ended without their worker clearing them (the reaper failed or
    cancelled them, the API cancelled a requeued one): nothing resumes them any more."""
    ids = job_store.clear_finished_states(session)
    for job_id in ids:
        after_commit(session, lambda job_id=job_id: storage.delete_tree(f"checkpoints/{job_id}/state"))  # type: ignore[misc]
    return ids


class Reaper:
    """Runs `reap` every `reaper_interval_seconds` in a daemon thread, and removes abandoned uploads."""

    def __init__(
        self,
        settings: Settings,
        session_factory: sessionmaker[Session],
        queue: Sender,
        storage: Storage | None = None,
    ) -> None:
        self.settings = settings
        self.storage = storage
        self.session_factory = session_factory
        self.queue = queue
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="graft-reaper", daemon=True)
        self._unreachable_until = 0.0

    def start(self) -> None:
        if self.settings.reaper_interval_seconds > 0:
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)

    def run_once(self) -> ReapResult | None:
        try:
            with session_scope(self.session_factory) as session:
                judge = time.monotonic() >= self._unreachable_until
                result = reap(session, self.settings, self.queue, judge_leases=judge)
            if self.storage is not None:
                with session_scope(self.session_factory) as session:
                    result.uploads_removed = remove_abandoned(session, self.storage, self.settings)
                    remove_finished_states(session, self.storage)
            return result
        except DBAPIError as exc:
            # Workers could not renew their leases while the database was away: give them a full lease
            # period after it is back before judging them.
            self._unreachable_until = time.monotonic() + self.settings.lease_seconds
            log.warning("reaper: database unreachable (%s)", type(exc.orig).__name__)
        except Exception:
            log.exception("reaper pass failed")
        return None

    def _loop(self) -> None:
        while not self._stop.wait(self.settings.reaper_interval_seconds):
            self.run_once()
