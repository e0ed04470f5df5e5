"""Running one job on a worker: claim it in the database, hand its spec to its kind's handler
(workers/handlers.py), report through the database while it trains, and always end in a final state.

The broker delivers at least once; the guarantees come from the database. A job is claimed with a lease:
a fencing token and a heartbeat (a thread renews it). Every write of the worker renews the lease in the
same transaction, so a worker that lost it (the reaper requeued the job after its heartbeat stopped)
writes nothing more and stops. A delivery of a job that is not `queued` (a duplicate, a job another
worker runs, one cancelled before it started) does nothing. Each run of a job keeps its training state in
a journal; a requeued job resumes from it. When the worker is shutting down the job saves its state and
goes back to the queue. Writes are retried while the database is unreachable. Every exception in training
becomes a failed job with its message, never a job stuck in running.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from sqlalchemy import Engine
from sqlalchemy.exc import DBAPIError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from graft import job_store as jobs
from graft.config import Settings, get_settings
from graft.db import is_transient, make_engine, make_session_factory, session_scope
from graft.ids import new_id, utcnow
from graft.job_store import JobStatus
from graft.spec import ModelSpec
from graft.storage import Storage, sha256_file
from graft.tables import Checkpoint, Job, JobEvent
from ml.resume import Journal, TrainingState, load_state, save_state
from ml.runtime import JobCancelled, JobPreempted, LeaseLost, as_error

log = logging.getLogger("graft.worker")


@dataclass
class WorkerContext:
    settings: Settings
    engine: Engine
    session_factory: sessionmaker[Session]
    storage: Storage


_context: WorkerContext | None = None
_context_pid: int | None = None


def worker_context() -> WorkerContext:
    """One engine per worker process (created after fork), sized for one job at a time."""
    global _context, _context_pid
    if _context is None or _context_pid != os.getpid():
        settings = get_settings()
        engine = make_engine(settings.effective_database_url, pool_size=2)
        _context = WorkerContext(
            settings, engine, make_session_factory(engine), Storage(settings.storage_dir)
        )
        _context_pid = os.getpid()
        if settings.torch_threads:
            import torch

            torch.set_num_threads(settings.torch_threads)
    return _context


# What a checkpoint of each method holds.
CHECKPOINT_CONTENTS = {
    "linear_probe": "head",
    "partial": "unfrozen blocks and head",
    "lora": "adapter and head",
    "full": "full",
}


T = TypeVar("T")


def worker_node() -> str:
    """This worker's name in lease owners: host and the pid of the Celery main process (set when the
    worker starts, inherited by its pool processes), so that a stopping worker finds the jobs it runs."""
    return os.environ.get("GRAFT_WORKER_NODE") or f"{socket.gethostname()}:{os.getpid()}"


@dataclass(frozen=True)
class Lease:
    job_id: str
    token: int
    owner: str


def write(context: WorkerContext, lease: Lease, work: Callable[[Session], T]) -> T:
    """Run `work` in one transaction that first renews the lease (LeaseLost when it is gone). While the
    database is unreachable (or the transaction lost a race) the whole unit is retried, with backoff, for
    up to `db_retry_seconds`. A unit must be safe to run again: when the connection drops during COMMIT
    nobody knows whether it landed."""
    deadline = time.monotonic() + context.settings.db_retry_seconds
    delay = 0.2
    while True:
        try:
            with session_scope(context.session_factory) as session:
                if not jobs.renew(session, lease.job_id, lease.token):
                    raise LeaseLost()
                return work(session)
        except DBAPIError as exc:
            if not is_transient(exc) or time.monotonic() > deadline:
                raise
            log.warning("database unreachable (%s); retrying in %.1fs", type(exc.orig).__name__, delay)
            time.sleep(delay)
            delay = min(delay * 2, 5.0)


class Heartbeat:
    """Renews the lease every `heartbeat_seconds` from a thread, so that a long step (a feature pass, an
    evaluation) never looks like a dead worker; notices when the lease is gone."""

    def __init__(self, context: WorkerContext, lease: Lease) -> None:
        self.context = context
        self.lease = lease
        self.lost = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{lease.job_id}", daemon=True)

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        interval = self.context.settings.heartbeat_seconds
        while not self._stop.wait(interval):
            try:
                with session_scope(self.context.session_factory) as session:
                    if not jobs.renew(session, self.lease.job_id, self.lease.token):
                        self.lost = True
                        log.warning("job %s: lease lost; stopping", self.lease.job_id)
                        return
            except DBAPIError as exc:
                log.warning("job %s: heartbeat failed: %s", self.lease.job_id, type(exc.orig).__name__)


class DatabaseReporter:
    """The recipe's reporter: events, progress, metrics and checkpoints go to the database as the job
    runs, each write fenced by the lease. Progress writes and stop checks are throttled so that fast
    steps stay fast."""

    PROGRESS_INTERVAL = 1.0
    # The job's own reporter keeps no journal: each run of its study gets one from `journal_for`.
    journal: Journal | None = None

    def __init__(
        self, context: WorkerContext, job: Job, lease: Lease, heartbeat: Heartbeat | None = None
    ) -> None:
        self.context = context
        self.job_id = job.id
        self.project_id = job.project_id
        self.lease = lease
        self.heartbeat = heartbeat
        self._last_progress = 0.0
        self._last_cancel_check = 0.0
        self.stop_reason: str | None = None

    def write(self, work: Callable[[Session], T]) -> T:
        return write(self.context, self.lease, work)

    def event(
        self, message: str, *, level: str = "info", data: dict[str, Any] | None = None, type: str = "message"
    ) -> None:
        self.write(
            lambda session: jobs.add_event(session, self.job_id, message, level=level, data=data, type=type)
        )

    def journal_for(self, run: str, primary: bool) -> DatabaseJournal:
        return DatabaseJournal(self, run, primary)

    def progress(self, *, epoch: int, epochs: int, step: int, total_steps: int) -> None:
        now = time.monotonic()
        # The first step is always written, so a client sees training begin at once.
        if step not in (0, 1, total_steps) and now - self._last_progress < self.PROGRESS_INTERVAL:
            return
        self._last_progress = now
        progress = {"epoch": epoch, "epochs": epochs, "step": step, "total_steps": total_steps}
        self.write(lambda session: jobs.progress(session, self.job_id, progress))

    def metrics(self, *, epoch: int, step: int, values: dict[str, float]) -> None:
        latest = {k: v for k, v in values.items() if k != "epoch_seconds"}
        shown = ", ".join(f"{k} {v:.4f}" for k, v in values.items() if k not in ("epoch", "epoch_seconds"))

        data = {"epoch": epoch, "step": step, **values}
        self.write(
            lambda session: jobs.record_metrics(session, self.job_id, latest, f"Epoch {epoch}: {shown}", data)
        )

    def checkpoint(
        self,
        *,
        epoch: int,
        step: int,
        tensors: dict[str, Any],
        spec: ModelSpec,
        metrics: dict[str, float],
        metadata: dict[str, str],
        best: bool,
    ) -> None:
        from ml.weights import save_weights

        storage = self.context.storage
        checkpoint_id = new_id("ckpt")
        key = f"checkpoints/{self.job_id}/{checkpoint_id}.safetensors"
        method = metadata.get("method", "full")
        extra = {
            **metadata,
            "job_id": self.job_id,
            "epoch": str(epoch),
            "step": str(step),
            "contains": CHECKPOINT_CONTENTS.get(method, method),
        }
        with storage.atomic_path(key) as temp:
            save_weights(temp, tensors, spec, extra=extra)
            size, digest = temp.stat().st_size, sha256_file(temp)

        row = Checkpoint(
            id=checkpoint_id,
            job_id=self.job_id,
            project_id=self.project_id,
            epoch=epoch,
            step=step,
            metrics={k: v for k, v in metrics.items() if k not in ("epoch", "epoch_seconds")},
            bytes=size,
            sha256=digest,
            path=key,
            created_at=utcnow(),
        )

        def work(session: Session) -> None:
            jobs.record_checkpoint(session, row, best=best)

        try:
            self.write(work)
        except DBAPIError:
            raise  # whether the last commit landed is unknown: the file stays
        except BaseException:
            storage.delete(key)
            raise

    def should_stop(self) -> bool:
        """True when the run must stop; `stop_reason` says why: cancel (the user asked), release (the
        worker is shutting down) or lease_lost (the job is no longer this worker's)."""
        if self.stop_reason is not None:
            return True
        if self.heartbeat is not None and self.heartbeat.lost:
            self.stop_reason = "lease_lost"
            return True
        now = time.monotonic()
        if now - self._last_cancel_check >= self.context.settings.cancel_poll_seconds:
            self._last_cancel_check = now
            try:
                with session_scope(self.context.session_factory) as session:
                    cancel, release = jobs.stop_flags(session, self.job_id)
            except DBAPIError:
                return False  # the database is away: keep training; writes wait for it
            self.stop_reason = "cancel" if cancel else "release" if release else None
        return self.stop_reason is not None


class DatabaseJournal:
    """One run's training state: a safetensors file in storage (a new file per save, so that the previous
    state stays whole until the new one is committed) and its entry in jobs.resume_state. Loading it also
    removes what the run wrote after that state (metrics events, checkpoints of later epochs), so that a
    resumed run's history has no duplicates and no gaps."""

    def __init__(self, reporter: DatabaseReporter, run: str, primary: bool) -> None:
        self.reporter = reporter
        self.run = run
        self.primary = primary

    @property
    def _storage(self) -> Storage:
        return self.reporter.context.storage

    def _owns(self, event: JobEvent) -> bool:
        data = event.data or {}
        return data.get("run") == self.run or (self.primary and "run" not in data)

    def load(self) -> TrainingState | None:
        job_id = self.reporter.job_id

        def work(session: Session) -> tuple[dict[str, Any] | None, list[str]]:
            entry = jobs.resume_state(session, job_id).get(self.run)
            # Epochs whose end the state includes: a state saved mid-epoch has not reported that epoch.
            kept = 0 if entry is None else entry["epoch"] - (1 if entry["batch"] else 0)
            files = jobs.rewind(
                session,
                job_id,
                kept,
                self._owns,
                checkpoints=self.primary,
                best_epoch=(entry or {}).get("best_epoch"),
            )
            return entry, files

        entry, files = self.reporter.write(work)
        for key in files:
            self._storage.delete(key)
        if entry is None:
            return None
        return load_state(self._storage.path(entry["path"]))

    def save(self, state: TrainingState) -> None:
        job_id = self.reporter.job_id
        key = f"{state_folder(job_id)}/{uuid.uuid4().hex}.safetensors"
        with self._storage.atomic_path(key) as temp:
            save_state(temp, state)
        entry = {
            "path": key,
            "epoch": state.epoch,
            "batch": state.batch,
            "step": state.step,
            "complete": state.complete,
            "best_epoch": int(state.meta.get("best_epoch", 0)),
        }

        def work(session: Session) -> str | None:
            return jobs.save_resume_entry(session, job_id, self.run, entry)

        try:
            previous = self.reporter.write(work)
        except DBAPIError:
            raise  # whether the last commit landed is unknown: the file stays
        except BaseException:
            self._storage.delete(key)
            raise
        if previous and previous != key:
            self._storage.delete(previous)


def _claim(context: WorkerContext, job_id: str) -> tuple[Job, Lease] | None:
    owner = f"{worker_node()}/{os.getpid()}"
    with session_scope(context.session_factory) as session:
        token = jobs.claim(session, job_id, owner)
        if token is None:
            job = jobs.get_any(session, job_id)
            if job is None:
                log.warning("job %s does not exist; dropping the message", job_id)
            else:
                log.info("job %s is %s; nothing to do for this delivery", job_id, job.status)
            return None
        job = jobs.get_any(session, job_id)
        assert job is not None
        attempt = f" (attempt {job.attempts})" if job.attempts > 1 else ""
        jobs.add_event(
            session,
            job_id,
            f"Job started on {socket.gethostname()} (pid {os.getpid()}){attempt}",
            data={"attempt": job.attempts, "worker": owner},
        )
        session.expunge(job)
        return job, Lease(job_id, token, owner)


def _error_for(exc: BaseException) -> dict[str, str]:
    """The error a failed job shows its users. A database error's text (the driver's message, the SQL
    statement, its parameters) is for the operator's log, never for the job."""
    if isinstance(exc, SQLAlchemyError):
        return {
            "code": "internal_error",
            "message": "the database refused to store the job's results; the operator finds why in the "
            "worker's log",
        }
    error = as_error(exc)
    return {"code": error.code, "message": error.message}


def _finish(
    context: WorkerContext,
    lease: Lease,
    status: JobStatus,
    message: str,
    *,
    error: dict[str, str] | None = None,
) -> bool:
    """Leave the running state (fenced by the lease): failed, cancelled, or queued again (its training
    state kept); False when the job was no longer this worker's."""

    def work(session: Session) -> None:
        if status == JobStatus.QUEUED:
            jobs.requeue(session, lease.job_id, message)
        else:
            jobs.finish(session, lease.job_id, status, message, error)

    try:
        write(context, lease, work)
    except LeaseLost:
        log.warning("job %s: lease lost before it could be marked %s", lease.job_id, status)
        return False
    if status != JobStatus.QUEUED:
        context.storage.delete_tree(state_folder(lease.job_id))
    return True


def state_folder(job_id: str) -> str:
    """Where a job's runs keep their training state (until the job ends)."""
    return f"checkpoints/{job_id}/state"


def _requeue(context: WorkerContext, lease: Lease) -> None:
    """The worker is stopping: the job (its training state saved) goes back to the queue. Its message is
    sent again by the worker's main process once it has stopped consuming (workers/tasks.py), so that the
    next worker, not this one, receives it."""
    with session_scope(context.session_factory) as session:
        saved = jobs.resume_state(session, lease.job_id)
    where = ", ".join(
        f"{run}: epoch {entry['epoch']}" + (f" batch {entry['batch']}" if entry["batch"] else "")
        for run, entry in saved.items()
    )
    message = "The worker is shutting down; the job was queued again" + (
        f" and resumes from its saved state ({where})" if where else " (no training state saved yet)"
    )
    _finish(context, lease, JobStatus.QUEUED, message)


def execute_job(job_id: str, context: WorkerContext | None = None) -> None:
    from workers.handlers import handle

    context = context or worker_context()
    claimed = _claim(context, job_id)
    if claimed is None:
        return
    job, lease = claimed
    with Heartbeat(context, lease) as heartbeat:
        reporter = DatabaseReporter(context, job, lease, heartbeat)
        try:
            handle(context, job, jobs.spec_of(job), reporter)
        except JobCancelled:
            _finish(context, lease, JobStatus.CANCELLED, "Job cancelled")
        except JobPreempted:
            _requeue(context, lease)
        except LeaseLost:
            log.warning("job %s: this worker lost its lease; it stopped without writing more", job.id)
        except Exception as exc:
            log.exception("job %s failed", job.id)
            error = _error_for(exc)
            _finish(context, lease, JobStatus.FAILED, f"Job failed: {error['message']}", error=error)
