"""All SQL of jobs, their events and checkpoints. State changes are conditional updates, so the API
(cancel) and a worker (claim, finish) never both win a transition."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from app.core.ids import new_id, utcnow
from app.tables import Checkpoint, Job, JobEvent


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


def get_checkpoint(session: Session, project_id: str, checkpoint_id: str) -> Checkpoint | None:
    return session.scalar(
        select(Checkpoint).where(Checkpoint.id == checkpoint_id, Checkpoint.project_id == project_id)
    )


def add_checkpoint(session: Session, row: Checkpoint) -> None:
    session.add(row)
    session.flush()


def now() -> datetime:
    return utcnow()
