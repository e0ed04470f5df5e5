"""All SQL of jobs, their events and checkpoints. State changes are conditional updates, so the API
(cancel) and a worker (claim, finish) never both win a transition."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import Select, bindparam, func, select, update
from sqlalchemy.orm import Session

from graft.ids import new_id, utcnow
from graft.tables import Checkpoint, Job, JobEvent


def get(session: Session, project_id: str, job_id: str) -> Job | None:
    return session.scalar(select(Job).where(Job.id == job_id, Job.project_id == project_id))


def get_any(session: Session, job_id: str) -> Job | None:
    return session.scalar(select(Job).where(Job.id == job_id))


def by_idempotency_key(session: Session, project_id: str, key: str) -> Job | None:
    return session.scalar(select(Job).where(Job.project_id == project_id, Job.idempotency_key == key))


def add(session: Session, job: Job) -> None:
    session.add(job)
    session.flush()


def add_event(
    session: Session,
    job_id: str,
    message: str,
    *,
    type: str = "message",
    level: str = "info",
    data: dict[str, Any] | None = None,
) -> JobEvent:
    event = JobEvent(
        id=new_id("evt"),
        job_id=job_id,
        type=type,
        level=level,
        message=message,
        data=data,
        created_at=utcnow(),
    )
    session.add(event)
    return event


def transition(session: Session, job_id: str, from_status: str, **values: Any) -> bool:
    """Set `values` only if the job is still in `from_status`; True when this call made the change."""
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == from_status)
        .values(**values)
        .execution_options(synchronize_session=False)
    )
    return result.rowcount == 1  # type: ignore[attr-defined]


def update_fields(session: Session, job_id: str, **values: Any) -> None:
    session.execute(
        update(Job).where(Job.id == job_id).values(**values).execution_options(synchronize_session=False)
    )


def cancel_requested(session: Session, job_id: str) -> bool:
    return bool(session.scalar(select(Job.cancel_requested).where(Job.id == job_id)))


# ---------------------------------------------------------------------------------------------- leases
# A worker runs a job under a lease: `claim` moves it from queued to running and gives the worker a fencing
# token (the job's lease_token, one more than any before it). Every write the worker makes afterwards
# first renews the lease with that token, in the same transaction; when the job has moved on (requeued by
# the reaper, claimed by someone else, finished) the renewal matches no row and the worker stops.


def claim(session: Session, job_id: str, owner: str) -> int | None:
    """Take a queued job; the new fencing token, or None when the job was not queued (a duplicate
    delivery, a cancelled job) or another worker won the race."""
    now = utcnow()
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == "queued")
        .values(
            status="running",
            lease_owner=owner,
            lease_token=Job.lease_token + 1,
            heartbeat_at=database_now(session),
            release_requested=False,
            attempts=Job.attempts + 1,
            started_at=func.coalesce(Job.started_at, now),
        )
        .execution_options(synchronize_session=False)
    )
    if result.rowcount != 1:  # type: ignore[attr-defined]
        return None
    return int(session.scalar(select(Job.lease_token).where(Job.id == job_id)) or 0)


def renew(session: Session, job_id: str, token: int) -> bool:
    """Extend the lease; False when the lease is no longer this token's (nothing is written then). On
    PostgreSQL the row stays locked until the transaction ends, so the reaper cannot requeue the job
    between this check and the writes that follow it."""
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.lease_token == token, Job.status == "running")
        .values(heartbeat_at=database_now(session))
        .execution_options(synchronize_session=False)
    )
    return result.rowcount == 1  # type: ignore[attr-defined]


def fenced_transition(session: Session, job_id: str, token: int, **values: Any) -> bool:
    """Leave the running state (finish, requeue) only while holding the lease."""
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.lease_token == token, Job.status == "running")
        .values(**values)
        .execution_options(synchronize_session=False)
    )
    return result.rowcount == 1  # type: ignore[attr-defined]


def stop_flags(session: Session, job_id: str) -> tuple[bool, bool]:
    """(cancel requested, release requested) of a job."""
    row = session.execute(
        select(Job.cancel_requested, Job.release_requested).where(Job.id == job_id)
    ).one_or_none()
    return (bool(row[0]), bool(row[1])) if row is not None else (True, False)


def request_release(session: Session, owner_prefix: str) -> list[str]:
    """Ask the running jobs of one worker (lease owners starting with `owner_prefix`) to checkpoint and go
    back to the queue; the ids asked. One conditional update: a job another worker took meanwhile is not
    touched."""
    mine = (Job.status == "running", Job.lease_owner.startswith(owner_prefix, autoescape=True))
    session.execute(
        update(Job).where(*mine).values(release_requested=True).execution_options(synchronize_session=False)
    )
    return list(session.scalars(select(Job.id).where(*mine, Job.release_requested.is_(True))))


def expired_leases(session: Session, cutoff: datetime) -> list[Job]:
    """Running jobs whose last heartbeat is older than `cutoff` (or that never had one)."""
    return list(session.scalars(select(Job).where(Job.status == "running", expired(cutoff)).order_by(Job.pk)))


def expired(cutoff: datetime) -> Any:
    return (Job.heartbeat_at < cutoff) | Job.heartbeat_at.is_(None)


def database_now(session: Session) -> Any:
    """The time leases are written and judged by. On PostgreSQL, the database's clock, so that the clocks
    of the machines running workers and API processes do not matter; SQLite is one machine's file."""
    return func.now() if session.get_bind().dialect.name == "postgresql" else utcnow()


def database_time(session: Session) -> datetime:
    """`database_now` as a value."""
    if session.get_bind().dialect.name == "postgresql":
        return session.scalar(select(func.now()))  # type: ignore[return-value]
    return utcnow()


def requeue_values() -> dict[str, Any]:
    """What goes back to its defaults when a job returns to the queue (its resume state stays)."""
    return {
        "status": "queued",
        "lease_owner": None,
        "heartbeat_at": None,
        "release_requested": False,
        "dispatched_at": utcnow(),
    }


def undispatched(session: Session, cutoff: datetime) -> list[str]:
    """Queued jobs last sent to the broker before `cutoff` (or never), oldest first."""
    return list(
        session.scalars(
            select(Job.id)
            .where(
                Job.status == "queued",
                (Job.dispatched_at < cutoff) | (Job.dispatched_at.is_(None) & (Job.created_at < cutoff)),
            )
            .order_by(Job.pk)
        )
    )


def get_checkpoint(session: Session, project_id: str, checkpoint_id: str) -> Checkpoint | None:
    return session.scalar(
        select(Checkpoint).where(Checkpoint.id == checkpoint_id, Checkpoint.project_id == project_id)
    )


def add_checkpoint(session: Session, row: Checkpoint) -> None:
    session.add(row)
    session.flush()


def now() -> datetime:
    return utcnow()


# ------------------------------------------------------------------------------------- async reads
# Status polling: one statement per read, only the columns a response needs (not the training state or
# the report, which can be large), run by the API's async reader (app/core/reads.py).

_JOB_COLUMNS = (
    Job.id,
    Job.project_id,
    Job.type,
    Job.status,
    Job.base_model,
    Job.training_dataset,
    Job.validation_dataset,
    Job.target_dataset,
    Job.unlabeled_dataset,
    Job.evaluation_dataset,
    Job.methods,
    Job.student,
    Job.method,
    Job.hyperparameters,
    Job.head,
    Job.initialization,
    Job.from_checkpoint,
    Job.baseline,
    Job.baseline_arms,
    Job.seeds,
    Job.transfer,
    Job.best_checkpoint,
    Job.seed,
    Job.user_metadata.label("user_metadata"),
    Job.progress,
    Job.metrics,
    Job.error,
    Job.result_model,
    Job.cancel_requested,
    Job.attempts,
    Job.worker_losses,
    Job.created_at,
    Job.started_at,
    Job.finished_at,
    Job.report.is_not(None).label("has_report"),
)

JOB_BY_ID = select(*_JOB_COLUMNS).where(
    Job.id == bindparam("job_id"), Job.project_id == bindparam("project_id")
)

JOB_EXISTS = select(Job.pk).where(Job.id == bindparam("job_id"), Job.project_id == bindparam("project_id"))


def _jobs_page(*, by_status: bool, after: bool) -> Select[Any]:
    stmt = select(*_JOB_COLUMNS).where(Job.project_id == bindparam("project_id"))
    if by_status:
        stmt = stmt.where(Job.status == bindparam("status"))
    if after:
        stmt = stmt.where(Job.pk < _job_cursor(by_status=by_status).scalar_subquery())
    return stmt.order_by(Job.pk.desc()).limit(bindparam("limit"))


def _job_cursor(*, by_status: bool) -> Select[Any]:
    """The pk of the `after` job, when it is in the list (the project's jobs, of `status` if filtered)."""
    stmt = select(Job.pk).where(Job.id == bindparam("after"), Job.project_id == bindparam("project_id"))
    return stmt.where(Job.status == bindparam("status")) if by_status else stmt


JOBS_PAGE = {(s, a): _jobs_page(by_status=s, after=a) for s in (False, True) for a in (False, True)}
JOB_CURSOR = {s: _job_cursor(by_status=s) for s in (False, True)}

_EVENT_COLUMNS = (
    JobEvent.id,
    JobEvent.type,
    JobEvent.level,
    JobEvent.message,
    JobEvent.data,
    JobEvent.created_at,
)


def _events_page(*, after: bool) -> Select[Any]:
    stmt = (
        select(*_EVENT_COLUMNS)
        .join(Job, Job.id == JobEvent.job_id)
        .where(Job.id == bindparam("job_id"), Job.project_id == bindparam("project_id"))
    )
    if after:
        cursor = (
            select(JobEvent.pk)
            .where(JobEvent.id == bindparam("after"), JobEvent.job_id == bindparam("job_id"))
            .scalar_subquery()
        )
        stmt = stmt.where(JobEvent.pk > cursor)
    return stmt.order_by(JobEvent.pk.asc()).limit(bindparam("limit"))


EVENTS_PAGE = {a: _events_page(after=a) for a in (False, True)}

EVENT_EXISTS = select(JobEvent.pk).where(
    JobEvent.id == bindparam("after"), JobEvent.job_id == bindparam("job_id")
)
