"""Job rules: check everything a job needs before it is queued; commit the row, then send its id."""

from __future__ import annotations

import hashlib
import json
import secrets
from typing import Any

from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.core.db import after_commit
from app.core.errors import Conflict, Unprocessable, not_found
from app.core.ids import new_id, utcnow
from app.core.queue import JobQueue
from app.core.security import Principal
from app.datasets import service as datasets
from app.jobs import repository
from app.jobs.schemas import JobCreate
from app.models import service as models
from app.tables import Checkpoint, Dataset, Job
from workers.backbones.catalog import BUILTIN_MODELS, TASK_MODALITY
from workers.recipes.defaults import default_hyperparameters


def request_fingerprint(body: JobCreate) -> str:
    canonical = json.dumps(body.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def _check_dataset_fits(dataset: Dataset, base: models.ResolvedModel, param: str) -> None:
    if not dataset.labeled:
        raise Unprocessable(
            f"dataset {dataset.id} has no labels; fine-tuning needs a labelled dataset",
            param=param,
            code="dataset_unlabeled",
        )
    modality = TASK_MODALITY[dataset.task]
    if modality != base.modality:
        raise Unprocessable(
            f"{base.id} is a {base.modality} model and dataset {dataset.id} is {dataset.task}",
            param="base_model",
            code="modality_mismatch",
        )
    if dataset.task == "tabular_classification" and base.row is not None:
        wanted = base.spec.input_spec.get("feature_columns", [])
        missing = [
            column for column in wanted if column not in dataset.schema_info.get("feature_columns", [])
        ]
        if missing:
            raise Unprocessable(
                f"dataset {dataset.id} lacks the column '{missing[0]}' that {base.id} was trained on",
                param=param,
                code="columns_mismatch",
            )


def resolve_hyperparameters(architecture: str, method: str, given: dict[str, Any]) -> dict[str, Any]:
    resolved = default_hyperparameters(architecture, method)
    resolved.update({key: value for key, value in given.items() if value is not None})
    return resolved


def create_job(
    session: Session, queue: JobQueue, principal: Principal, body: JobCreate, idempotency_key: str | None
) -> tuple[Job, bool]:
    """The job, and whether it was created now (False: an earlier request with the same key made it)."""
    fingerprint = request_fingerprint(body)
    if idempotency_key is not None:
        existing = repository.by_idempotency_key(session, principal.project_id, idempotency_key)
        if existing is not None:
            return _replay(existing, fingerprint), False

    base = models.resolve(session, principal, body.base_model, param="base_model")
    train = datasets.get_dataset(
        session, principal, body.training_dataset, param="training_dataset", for_update=True
    )
    _check_dataset_fits(train, base, "training_dataset")
    if train.num_examples < 2:
        raise Unprocessable(
            f"dataset {train.id} has {train.num_examples} example; at least 2 are needed",
            param="training_dataset",
        )
    if body.validation_dataset is not None:
        validation = datasets.get_dataset(
            session, principal, body.validation_dataset, param="validation_dataset"
        )
        if validation.task != train.task:
            raise Unprocessable(
                f"validation dataset {validation.id} is {validation.task}, the training dataset {train.task}",
                param="validation_dataset",
                code="task_mismatch",
            )
        _check_dataset_fits(validation, base, "validation_dataset")
        if train.task == "tabular_classification":
            needed = base.spec.input_spec.get("feature_columns") or train.schema_info["feature_columns"]
            missing = [c for c in needed if c not in validation.schema_info.get("feature_columns", [])]
            if missing:
                raise Unprocessable(
                    f"validation dataset {validation.id} lacks the feature column '{missing[0]}'",
                    param="validation_dataset",
                    code="columns_mismatch",
                )
        unknown = sorted(set(validation.classes) - set(train.classes))
        if unknown:
            raise Unprocessable(
                f"validation dataset has classes the training dataset lacks: {', '.join(unknown[:5])}",
                param="validation_dataset",
                code="classes_mismatch",
            )
    builtin = BUILTIN_MODELS.get(base.id)
    if builtin is not None and body.method not in builtin.methods:
        raise Unprocessable(
            f"{base.id} has random initial weights, so {body.method} would train a head on random features; "
            f"use one of: {', '.join(builtin.methods)}",
            param="method",
            code="method_not_supported",
        )

    job = Job(
        id=new_id("job"),
        project_id=principal.project_id,
        type=body.type,
        status="queued",
        base_model=base.id,
        training_dataset=train.id,
        validation_dataset=body.validation_dataset,
        method=body.method,
        hyperparameters=resolve_hyperparameters(
            base.architecture, body.method, body.hyperparameters.model_dump(exclude_none=True)
        ),
        seed=body.seed if body.seed is not None else secrets.randbelow(2**32),
        user_metadata=body.metadata,
        idempotency_key=idempotency_key,
        request_hash=fingerprint,
        cancel_requested=False,
        attempts=0,
        created_at=utcnow(),
    )
    if idempotency_key is not None:
        try:
            with session.begin_nested():
                repository.add(session, job)
        except IntegrityError:
            # A concurrent request with the same key won the insert.
            existing = repository.by_idempotency_key(session, principal.project_id, idempotency_key)
            if existing is None:
                raise
            return _replay(existing, fingerprint), False
    else:
        repository.add(session, job)
    repository.add_event(session, job.id, f"Job created: {body.method} fine-tune of {base.id} on {train.id}")
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
    job = repository.get(session, principal.project_id, job_id)
    if job is None:
        raise not_found("job", job_id)
    return job


def cancel_job(session: Session, principal: Principal, job_id: str) -> Job:
    """A queued job is cancelled at once and never starts; a running one is asked to stop and does so
    within a few steps (the training loop reads this flag), freeing its worker."""
    job = get_job(session, principal, job_id)
    now = utcnow()
    if repository.transition(session, job.id, "queued", status="cancelled", finished_at=now):
        repository.add_event(session, job.id, "Job cancelled before it started")
    elif repository.transition(session, job.id, "running", cancel_requested=True):
        repository.add_event(session, job.id, "Cancellation requested; the job stops within a few steps")
    else:
        session.refresh(job)
        raise Conflict(f"job {job.id} is already {job.status}", code="job_not_cancellable")
    session.refresh(job)
    return job


def get_checkpoint(session: Session, principal: Principal, checkpoint_id: str) -> Checkpoint:
    row = repository.get_checkpoint(session, principal.project_id, checkpoint_id)
    if row is None:
        raise not_found("checkpoint", checkpoint_id)
    return row
