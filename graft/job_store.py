"""Every write to a job's state, and the reads the writers need: one module, one named transition per
change (create, claim, renew, progress, metrics, checkpoint, save and rewind resume state, succeed, fail,
cancel, requeue, release). State changes are conditional updates, so the API (cancel), the reaper
(expired leases) and a worker (claim, finish) never both win a transition; a worker's writes are fenced by
its lease token (`renew` in the same transaction). No job SQL lives anywhere else."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import Select, bindparam, delete, func, null, or_, select, update
from sqlalchemy.orm import Session

from graft import jobspec
from graft.ids import new_id, utcnow
from graft.jobspec import JobSpec
from graft.plan import JobPlan
from graft.tables import Checkpoint, Job, JobEvent


class JobStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


ACTIVE = (JobStatus.QUEUED, JobStatus.RUNNING)
TERMINAL = (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED)


def get(session: Session, project_id: str, job_id: str) -> Job | None:
    return session.scalar(select(Job).where(Job.id == job_id, Job.project_id == project_id))


def get_any(session: Session, job_id: str) -> Job | None:
    return session.scalar(select(Job).where(Job.id == job_id))


def by_idempotency_key(session: Session, project_id: str, key: str) -> Job | None:
    return session.scalar(select(Job).where(Job.project_id == project_id, Job.idempotency_key == key))


def new_job(project_id: str, spec: JobSpec, *, seed: int, plan: JobPlan | None = None, **fields: Any) -> Job:
    """A queued job's row (not yet added): its kind's spec, the plan of its runs, the listing columns drawn
    from the spec, and `fields` (what the API found: the transfer plan; the client's metadata and
    idempotency key)."""
    return Job(
        id=new_id("job"),
        project_id=project_id,
        status=JobStatus.QUEUED,
        seed=seed,
        cancel_requested=False,
        attempts=0,
        created_at=utcnow(),
        spec=jobspec.dump(spec),
        plan=plan.model_dump(mode="json") if plan is not None else None,
        **jobspec.columns(spec),
        **fields,
    )


def spec_of(job: Job) -> JobSpec:
    """The job's spec as its kind's planner resolved it."""
    if job.spec is None:
        raise ValueError(f"job {job.id} has no spec")
    return jobspec.parse(job.spec)


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


def _transition(session: Session, job_id: str, from_status: str, *where: Any, **values: Any) -> bool:
    """Set `values` only if the job is still in `from_status` (and `where` holds); True when this call
    made the change."""
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == from_status, *where)
        .values(**values)
        .execution_options(synchronize_session=False)
    )
    return result.rowcount == 1  # type: ignore[attr-defined]


def _set(session: Session, job_id: str, **values: Any) -> None:
    session.execute(
        update(Job).where(Job.id == job_id).values(**values).execution_options(synchronize_session=False)
    )


def active_job_using(session: Session, dataset_id: str) -> str | None:
    """A queued or running job that reads the dataset, if any (it may not be deleted under it)."""
    return session.scalar(
        select(Job.id)
        .where(
            Job.status.in_(ACTIVE),
            or_(
                Job.training_dataset == dataset_id,
                Job.validation_dataset == dataset_id,
                Job.target_dataset == dataset_id,
                Job.evaluation_dataset == dataset_id,
                Job.unlabeled_dataset == dataset_id,
            ),
        )
        .limit(1)
    )


# ----------------------------------------------------------------------------------- the API's changes


def cancel(session: Session, job_id: str) -> str | None:
    """A queued job is cancelled at once ("cancelled"); a running one is asked to stop ("requested");
    None when the job had already finished."""
    if _transition(session, job_id, JobStatus.QUEUED, status=JobStatus.CANCELLED, finished_at=utcnow()):
        add_event(session, job_id, "Job cancelled before it started")
        return "cancelled"
    if _transition(
        session, job_id, JobStatus.RUNNING, Job.cancel_requested.is_(False), cancel_requested=True
    ):
        add_event(session, job_id, "Cancellation requested; the job stops within a few steps")
        return "requested"
    if session.scalar(select(Job.id).where(Job.id == job_id, Job.status == JobStatus.RUNNING)) is not None:
        return "requested"  # asked before: the same answer, and nothing more written
    return None


# ---------------------------------------------------------------------------------------------- leases
# A worker runs a job under a lease: `claim` moves it from queued to running and gives the worker a fencing
# token (the job's lease_token, one more than any before it). Every write the worker makes afterwards
# first renews the lease with that token, in the same transaction; when the job has moved on (requeued by
# the reaper, claimed by someone else, finished) the renewal matches no row and the worker stops.


def claim(session: Session, job_id: str, owner: str) -> int | None:
    """Take a queued job; the new fencing token, or None when the job was not queued (a duplicate
    delivery, a cancelled job) or another worker won the race."""
    now = utcnow()
    claimed = _transition(
        session,
        job_id,
        JobStatus.QUEUED,
        status=JobStatus.RUNNING,
        lease_owner=owner,
        lease_token=Job.lease_token + 1,
        heartbeat_at=database_now(session),
        release_requested=False,
        attempts=Job.attempts + 1,
        started_at=func.coalesce(Job.started_at, now),
    )
    if not claimed:
        return None
    return int(session.scalar(select(Job.lease_token).where(Job.id == job_id)) or 0)


def renew(session: Session, job_id: str, token: int) -> bool:
    """Extend the lease; False when the lease is no longer this token's (nothing is written then). On
    PostgreSQL the row stays locked until the transaction ends, so the reaper cannot requeue the job
    between this check and the writes that follow it."""
    return _transition(
        session, job_id, JobStatus.RUNNING, Job.lease_token == token, heartbeat_at=database_now(session)
    )


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
    mine = (Job.status == JobStatus.RUNNING, Job.lease_owner.startswith(owner_prefix, autoescape=True))
    session.execute(
        update(Job).where(*mine).values(release_requested=True).execution_options(synchronize_session=False)
    )
    return list(session.scalars(select(Job.id).where(*mine, Job.release_requested.is_(True))))


def still_queued(session: Session, job_ids: Sequence[str]) -> list[str]:
    """Those of `job_ids` that are queued (a released job nobody has claimed again yet)."""
    return list(session.scalars(select(Job.id).where(Job.id.in_(job_ids), Job.status == JobStatus.QUEUED)))


# ------------------------------------------------------------------------------- a worker's writes
# Each runs inside the transaction that renewed the lease (workers/runner.py `write`).


def progress(session: Session, job_id: str, values: dict[str, int]) -> None:
    _set(session, job_id, progress=values)


def record_metrics(
    session: Session, job_id: str, latest: dict[str, float], message: str, data: dict[str, Any]
) -> None:
    """The latest epoch's metrics on the job, and a metrics event in its history."""
    _set(session, job_id, metrics=latest)
    add_event(session, job_id, message, type="metrics", data=data)


def record_checkpoint(session: Session, row: Checkpoint, *, best: bool) -> None:
    """A checkpoint's row (its file is already whole in storage); once, should a retry follow a commit
    whose acknowledgement was lost. `best`: the job's best checkpoint now."""
    if session.scalar(select(Checkpoint.id).where(Checkpoint.id == row.id)) is not None:
        return
    session.add(row)
    session.flush()
    if best:
        _set(session, row.job_id, best_checkpoint=row.id)


def resume_state(session: Session, job_id: str) -> dict[str, Any]:
    """Per run of the job, where its saved training state is (empty when none is)."""
    return dict(session.scalar(select(Job.resume_state).where(Job.id == job_id)) or {})


def save_resume_entry(session: Session, job_id: str, run: str, entry: dict[str, Any]) -> str | None:
    """Point one run's resume state at a new file; the path of the file it replaces, if any."""
    current = resume_state(session, job_id)
    previous = (current.get(run) or {}).get("path")
    current[run] = entry
    _set(session, job_id, resume_state=current)
    return previous


def rewind(
    session: Session,
    job_id: str,
    kept_epochs: int,
    owns: Callable[[JobEvent], bool],
    *,
    checkpoints: bool,
    best_epoch: int | None,
) -> list[str]:
    """Remove what a run wrote after the epochs its saved state includes: its metrics events of later
    epochs (`owns` says which events are the run's) and, for the job's primary run (`checkpoints`), the
    checkpoints of later epochs, the best checkpoint then pointing at `best_epoch`'s. The storage keys of
    the removed checkpoints' files (to delete once this commits)."""
    stale = [
        event.id
        for event in session.scalars(
            select(JobEvent).where(JobEvent.job_id == job_id, JobEvent.type == "metrics")
        )
        if owns(event) and int((event.data or {}).get("epoch", 0)) > kept_epochs
    ]
    if stale:
        session.execute(delete(JobEvent).where(JobEvent.id.in_(stale)))
    if not checkpoints:
        return []
    later = list(
        session.scalars(select(Checkpoint).where(Checkpoint.job_id == job_id, Checkpoint.epoch > kept_epochs))
    )
    if later:
        session.execute(delete(Checkpoint).where(Checkpoint.id.in_([row.id for row in later])))
        best = session.scalar(
            select(Checkpoint.id).where(
                Checkpoint.job_id == job_id, Checkpoint.epoch == (-1 if best_epoch is None else best_epoch)
            )
        )
        _set(session, job_id, best_checkpoint=best)
    return [row.path for row in later]


def result_model(session: Session, job_id: str) -> str | None:
    return session.scalar(select(Job.result_model).where(Job.id == job_id))


def succeed(session: Session, job_id: str, **values: Any) -> bool:
    """running -> succeeded with the job's results (`values`: metrics, result_model, report...); its
    training state served its purpose and is cleared."""
    return _transition(
        session,
        job_id,
        JobStatus.RUNNING,
        status=JobStatus.SUCCEEDED,
        finished_at=utcnow(),
        resume_state=null(),  # SQL NULL, not JSON null
        **values,
    )


def finish(
    session: Session, job_id: str, status: JobStatus, message: str, error: dict[str, str] | None = None
) -> bool:
    """running -> failed or cancelled, the worker's own end of the job, with its event."""
    assert status in (JobStatus.FAILED, JobStatus.CANCELLED)
    values: dict[str, Any] = {"status": status, "finished_at": utcnow(), "resume_state": null()}
    if error is not None:
        values["error"] = error
    done = _transition(session, job_id, JobStatus.RUNNING, **values)
    add_event(session, job_id, message, level="error" if status == JobStatus.FAILED else "info")
    return done


def requeue(
    session: Session,
    job_id: str,
    message: str,
    *where: Any,
    level: str = "info",
    data: dict[str, Any] | None = None,
    **values: Any,
) -> bool:
    """running -> queued (its resume state stays, for the next worker), with its event; `where`: further
    conditions (the reaper's fence)."""
    if not _transition(session, job_id, JobStatus.RUNNING, *where, **requeue_values(), **values):
        return False
    add_event(session, job_id, message, level=level, data=data)
    return True


def requeue_values() -> dict[str, Any]:
    """What goes back to its defaults when a job returns to the queue (its resume state stays)."""
    return {
        "status": JobStatus.QUEUED,
        "lease_owner": None,
        "heartbeat_at": None,
        "release_requested": False,
        "dispatched_at": utcnow(),
    }


def requeue_interrupted(session: Session, message: str) -> list[str]:
    """Every running job back to the queue (embedded mode at start: its one worker is gone)."""
    ids = list(session.scalars(select(Job.id).where(Job.status == JobStatus.RUNNING)))
    return [job_id for job_id in ids if requeue(session, job_id, message)]


def queued(session: Session) -> list[str]:
    """Queued jobs, oldest first."""
    return list(session.scalars(select(Job.id).where(Job.status == JobStatus.QUEUED).order_by(Job.pk)))


# -------------------------------------------------------------------------------------- the reaper


def expired_leases(session: Session, cutoff: datetime) -> list[Job]:
    """Running jobs whose last heartbeat is older than `cutoff` (or that never had one)."""
    return list(
        session.scalars(select(Job).where(Job.status == JobStatus.RUNNING, _expired(cutoff)).order_by(Job.pk))
    )


def _expired(cutoff: datetime) -> Any:
    return (Job.heartbeat_at < cutoff) | Job.heartbeat_at.is_(None)


def end_lost(
    session: Session, job: Job, cutoff: datetime, status: JobStatus, message: str, **values: Any
) -> bool:
    """A job whose worker stopped answering: cancelled (it had been asked) or failed (it lost too many
    workers), only if nothing changed since it was read (the same lease, still no fresh heartbeat)."""
    assert status in (JobStatus.FAILED, JobStatus.CANCELLED)
    fence = (Job.lease_token == job.lease_token, _expired(cutoff))
    ended = _transition(
        session,
        job.id,
        JobStatus.RUNNING,
        *fence,
        status=status,
        finished_at=utcnow(),
        lease_owner=None,
        **values,
    )
    if ended:
        add_event(session, job.id, message, level="error" if status == JobStatus.FAILED else "info")
    return ended


def requeue_lost(
    session: Session, job: Job, cutoff: datetime, message: str, data: dict[str, Any], losses: int
) -> bool:
    """A job whose worker stopped answering back to the queue, fenced as `end_lost`."""
    fence = (Job.lease_token == job.lease_token, _expired(cutoff))
    return requeue(session, job.id, message, *fence, level="warning", data=data, worker_losses=losses)


def undispatched(session: Session, cutoff: datetime) -> list[str]:
    """Queued jobs last sent to the broker before `cutoff` (or never), oldest first."""
    return list(
        session.scalars(
            select(Job.id)
            .where(
                Job.status == JobStatus.QUEUED,
                (Job.dispatched_at < cutoff) | (Job.dispatched_at.is_(None) & (Job.created_at < cutoff)),
            )
            .order_by(Job.pk)
        )
    )


def mark_dispatched(session: Session, job_id: str, at: datetime) -> None:
    _set(session, job_id, dispatched_at=at)


def clear_finished_states(session: Session) -> list[str]:
    """Jobs that ended with a resume state left (the reaper failed or cancelled them, the API cancelled a
    requeued one): the state is cleared; their ids, for their files to go."""
    ids = list(session.scalars(select(Job.id).where(Job.status.in_(TERMINAL), Job.resume_state.is_not(None))))
    for job_id in ids:
        _set(session, job_id, resume_state=null())
    return ids


def database_now(session: Session) -> Any:
    """The time leases are written and judged by. On PostgreSQL, the database's clock, so that the clocks
    of the machines running workers and API processes do not matter; SQLite is one machine's file."""
    return func.now() if session.get_bind().dialect.name == "postgresql" else utcnow()


def database_time(session: Session) -> datetime:
    """`database_now` as a value."""
    if session.get_bind().dialect.name == "postgresql":
        return session.scalar(select(func.now()))  # type: ignore[return-value]
    return utcnow()


# ---------------------------------------------------------------------------------------- checkpoints


def get_checkpoint(session: Session, project_id: str, checkpoint_id: str) -> Checkpoint | None:
    return session.scalar(
        select(Checkpoint).where(Checkpoint.id == checkpoint_id, Checkpoint.project_id == project_id)
    )


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

# A job with the plan of its runs; the list pages leave plans out (a page of them is tens of kilobytes).
JOB_BY_ID = select(*_JOB_COLUMNS, Job.plan).where(
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
