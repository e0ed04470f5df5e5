"""Job rules: pick the kind's planner (app/jobs/planners/), which checks everything a job needs before it
is queued and resolves its spec; commit the row, then send its id. Reading, cancelling, checkpoints and
reports of jobs."""

from __future__ import annotations

import hashlib
import json
import secrets
from typing import Any

from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.core.errors import Conflict, NotFound, not_found
from app.core.security import Principal
from app.jobs.planners import adapt, distill, training
from app.jobs.planners.common import MAX_COMPUTE_HOURS, MAX_EPOCH_PASSES, MAX_OPTIMIZER_STEPS, BudgetLimits
from app.jobs.schemas import AdaptJobCreate, DistillJobCreate, JobCreate
from graft import job_store
from graft.db import after_commit
from graft.queueing import JobQueue
from graft.storage import Storage
from graft.tables import Checkpoint, Job


def request_fingerprint(body: JobCreate) -> str:
    canonical = json.dumps(body.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def create_job(
    session: Session,
    storage: Storage,
    queue: JobQueue,
    principal: Principal,
    body: JobCreate,
    idempotency_key: str | None,
    *,
    max_epoch_passes: int = MAX_EPOCH_PASSES,
    max_optimizer_steps: int = MAX_OPTIMIZER_STEPS,
    max_compute_hours: float = MAX_COMPUTE_HOURS,
) -> tuple[Job, bool]:
    """The job, and whether it was created now (False: an earlier request with the same key made it).
    A job training more than `max_epoch_passes` passes over its data, or `max_optimizer_steps` steps, or
    whose estimated compute is above `max_compute_hours` of the reference machine, is refused."""
    fingerprint = request_fingerprint(body)
    if idempotency_key is not None:
        existing = job_store.by_idempotency_key(session, principal.project_id, idempotency_key)
        if existing is not None:
            return _replay(existing, fingerprint), False

    limits = BudgetLimits(
        epoch_passes=max_epoch_passes,
        optimizer_steps=max_optimizer_steps,
        compute_seconds=max_compute_hours * 3600,
    )
    seed = body.seed if body.seed is not None else secrets.randbelow(2**32)
    if isinstance(body, AdaptJobCreate):
        plan = adapt.plan(session, principal, body, limits, seed)
    elif isinstance(body, DistillJobCreate):
        plan = distill.plan(session, principal, body, limits, seed)
    else:
        plan = training.plan(session, storage, principal, body, limits, seed)
    job = job_store.new_job(
        principal.project_id,
        plan.spec,
        seed=seed,
        plan=plan.runs,
        transfer=plan.transfer,
        user_metadata=body.metadata,
        idempotency_key=idempotency_key,
        request_hash=fingerprint,
    )
    if idempotency_key is not None:
        try:
            with session.begin_nested():
                job_store.add(session, job)
        except IntegrityError:
            # A concurrent request with the same key won the insert.
            existing = job_store.by_idempotency_key(session, principal.project_id, idempotency_key)
            if existing is None:
                raise
            return _replay(existing, fingerprint), False
    else:
        job_store.add(session, job)
    job_store.add_event(session, job.id, plan.description)
    job_id = job.id
    after_commit(session, lambda: queue.send(job_id))
    return job, True


def _replay(existing: Job, fingerprint: str) -> Job:
    if existing.request_hash != fingerprint:
        raise Conflict(
            "this Idempotency-Key was used with a different request body",
            param="Idempotency-Key",
            code="idempotency_key_reused",
        )
    return existing


def get_job(session: Session, principal: Principal, job_id: str) -> Job:
    job = job_store.get(session, principal.project_id, job_id)
    if job is None:
        raise not_found("job", job_id)
    return job


def cancel_job(session: Session, principal: Principal, job_id: str) -> Job:
    """A queued job is cancelled at once and never starts; a running one is asked to stop and does so
    within a few steps (the training loop reads this flag), freeing its worker."""
    job = get_job(session, principal, job_id)
    if job_store.cancel(session, job.id) is None:
        session.refresh(job)
        raise Conflict(f"job {job.id} is already {job.status}", code="job_not_cancellable")
    session.refresh(job)
    return job


def get_checkpoint(
    session: Session, principal: Principal, checkpoint_id: str, param: str | None = None
) -> Checkpoint:
    row = job_store.get_checkpoint(session, principal.project_id, checkpoint_id)
    if row is None:
        raise not_found("checkpoint", checkpoint_id, param=param)
    return row


def no_report(job_type: str, status: str, baseline: bool) -> NotFound:
    """Why a job has no report (yet)."""
    if job_type not in ("adapt", "distill") and not baseline:
        reason = "this job has no report: create it with baseline true to compare with training from scratch"
    else:
        reason = f"the report is written when the job succeeds; it is {status}"
    return NotFound(reason, code="report_not_available")


def report_of(job: Job) -> dict[str, Any]:
    if job.report is None:
        raise no_report(job.type, job.status, job.baseline)
    report = {"job_id": job.id, "kind": "transfer", **job.report}
    if report["kind"] == "adaptation":
        # JSON columns need not keep key order (PostgreSQL's JSONB does not): source_only first, then the
        # methods as requested.
        order = ["source_only", *(job.methods or [])]
        report["methods"] = {m: report["methods"][m] for m in order if m in report["methods"]}
    return report
