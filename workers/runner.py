"""Running one job on a worker: claim it in the database, build the recipe's config from the rows,
report through the database while it trains, register the result, and always end in a final state.

A delivery of a job that is not `queued` (a duplicate, or one cancelled before it started) does
nothing. Every exception in training becomes a failed job with its message, never a job stuck in running.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Engine, select
from sqlalchemy.orm import Session, sessionmaker

from app.core.config import Settings, get_settings
from app.core.db import make_engine, make_session_factory, session_scope
from app.core.ids import new_id, utcnow
from app.core.storage import Storage, sha256_file
from app.datasets.formats import FormatError
from app.jobs import repository as jobs
from app.tables import Checkpoint, Dataset, Job, Model
from workers.backbones.catalog import BUILTIN_MODELS
from workers.backbones.spec import ModelSpec
from workers.recipes.base import BaseModelSource, DatasetSource, JobCancelled

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


class DatabaseReporter:
    """The recipe's reporter: events, progress, metrics and checkpoints go to the database as the job
    runs. Progress writes and cancel checks are throttled so that fast steps stay fast."""

    PROGRESS_INTERVAL = 1.0

    def __init__(self, context: WorkerContext, job: Job) -> None:
        self.context = context
        self.job_id = job.id
        self.project_id = job.project_id
        self._last_progress = 0.0
        self._last_cancel_check = 0.0
        self._stop = False

    def _session(self) -> Any:
        return session_scope(self.context.session_factory)

    def event(self, message: str, *, level: str = "info", data: dict[str, Any] | None = None) -> None:
        with self._session() as session:
            jobs.add_event(session, self.job_id, message, level=level, data=data)

    def progress(self, *, epoch: int, epochs: int, step: int, total_steps: int) -> None:
        now = time.monotonic()
        if step not in (0, total_steps) and now - self._last_progress < self.PROGRESS_INTERVAL:
            return
        self._last_progress = now
        with self._session() as session:
            jobs.update_fields(
                session,
                self.job_id,
                progress={"epoch": epoch, "epochs": epochs, "step": step, "total_steps": total_steps},
            )

    def metrics(self, *, epoch: int, step: int, values: dict[str, float]) -> None:
        latest = {k: v for k, v in values.items() if k != "epoch_seconds"}
        shown = ", ".join(f"{k} {v:.4f}" for k, v in values.items() if k not in ("epoch", "epoch_seconds"))
        with self._session() as session:
            jobs.update_fields(session, self.job_id, metrics=latest)
            jobs.add_event(
                session,
                self.job_id,
                f"Epoch {epoch}: {shown}",
                type="metrics",
                data={"epoch": epoch, "step": step, **values},
            )

    def checkpoint(
        self, *, epoch: int, step: int, tensors: dict[str, Any], spec: ModelSpec, metrics: dict[str, float]
    ) -> None:
        from workers.backbones.weights import save_weights

        storage = self.context.storage
        checkpoint_id = new_id("ckpt")
        key = f"checkpoints/{self.job_id}/{checkpoint_id}.safetensors"
        contains = "full" if any(name.startswith("backbone.") for name in tensors) else "head"
        with storage.atomic_path(key) as temp:
            save_weights(
                temp,
                tensors,
                spec,
                extra={"job_id": self.job_id, "epoch": str(epoch), "step": str(step), "contains": contains},
            )
            size, digest = temp.stat().st_size, sha256_file(temp)
        try:
            with self._session() as session:
                jobs.add_checkpoint(
                    session,
                    Checkpoint(
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
                    ),
                )
        except Exception:
            storage.delete(key)
            raise

    def should_stop(self) -> bool:
        if self._stop:
            return True
        now = time.monotonic()
        if now - self._last_cancel_check >= self.context.settings.cancel_poll_seconds:
            self._last_cancel_check = now
            with self._session() as session:
                self._stop = jobs.cancel_requested(session, self.job_id)
        return self._stop


def _claim(context: WorkerContext, job_id: str) -> Job | None:
    with session_scope(context.session_factory) as session:
        job = jobs.get_any(session, job_id)
        if job is None:
            log.warning("job %s does not exist; dropping the message", job_id)
            return None
        if job.status != "queued":
            log.info("job %s is %s; nothing to do for this delivery", job_id, job.status)
            return None
        if not jobs.transition(
            session, job_id, "queued", status="running", started_at=utcnow(), attempts=job.attempts + 1
        ):
            return None
        jobs.add_event(session, job_id, f"Job started on {socket.gethostname()} (pid {os.getpid()})")
        session.expunge(job)
        return job


def _dataset_source(context: WorkerContext, session: Session, dataset_id: str) -> DatasetSource:
    row = session.scalar(select(Dataset).where(Dataset.id == dataset_id))
    if row is None:
        raise FileNotFoundError(f"dataset {dataset_id} was deleted")
    return DatasetSource(
        id=row.id,
        path=context.storage.path(row.path),
        task=row.task,
        format=row.format,
        labeled=row.labeled,
        classes=list(row.classes),
        schema_info=dict(row.schema_info),
    )


def _base_source(context: WorkerContext, session: Session, job: Job) -> BaseModelSource:
    builtin = BUILTIN_MODELS.get(job.base_model)
    if builtin is not None:
        return BaseModelSource(
            id=builtin.id, spec=ModelSpec.for_builtin(builtin.id), pretrained=builtin.pretrained
        )
    row = session.scalar(select(Model).where(Model.id == job.base_model, Model.project_id == job.project_id))
    if row is None:
        raise FileNotFoundError(f"base model {job.base_model} no longer exists")
    return BaseModelSource(
        id=row.id,
        spec=ModelSpec.model_validate(row.spec),
        weights_path=context.storage.path(row.weights_path),
    )


def _register_result(context: WorkerContext, job: Job, result: Any) -> None:
    """Save the model's weights, then register the model and mark the job succeeded in one transaction."""
    from workers.backbones.weights import save_weights

    storage = context.storage
    model_id = new_id("mdl")
    key = f"models/{model_id}/model.safetensors"
    with storage.atomic_path(key) as temp:
        save_weights(temp, result.state, result.spec, extra={"job_id": job.id, "base_model": job.base_model})
        size, digest = temp.stat().st_size, sha256_file(temp)
    try:
        with session_scope(context.session_factory) as session:
            dataset_name = session.scalar(select(Dataset.name).where(Dataset.id == job.training_dataset))
            session.add(
                Model(
                    id=model_id,
                    project_id=job.project_id,
                    name=f"{job.base_model} fine-tuned on {dataset_name or job.training_dataset}",
                    kind="finetuned",
                    architecture=result.spec.architecture,
                    modality=result.spec.modality,
                    classes=list(result.spec.classes),
                    metrics=result.metrics,
                    spec=result.spec.model_dump(),
                    num_parameters=result.num_parameters,
                    job_id=job.id,
                    base_model=job.base_model,
                    training_dataset=job.training_dataset,
                    weights_path=key,
                    weights_bytes=size,
                    weights_sha256=digest,
                    created_at=utcnow(),
                )
            )
            finished = jobs.transition(
                session,
                job.id,
                "running",
                status="succeeded",
                finished_at=utcnow(),
                result_model=model_id,
                metrics=result.metrics,
            )
            if not finished:
                raise RuntimeError(f"job {job.id} left the running state while it trained")
            jobs.add_event(
                session, job.id, f"Job succeeded; registered model {model_id}", data={"model": model_id}
            )
    except Exception:
        storage.delete_tree(f"models/{model_id}")
        raise


def _error_for(exc: BaseException) -> dict[str, str]:
    if isinstance(exc, FormatError):
        return {"code": "invalid_data", "message": exc.message}
    if isinstance(exc, FileNotFoundError):
        return {"code": "missing_input", "message": str(exc)}
    if type(exc).__name__ == "OutOfMemoryError":
        return {"code": "out_of_memory", "message": f"the device ran out of memory: {exc}"[:2000]}
    return {"code": "training_error", "message": f"{type(exc).__name__}: {exc}"[:2000]}


def _finish(
    context: WorkerContext, job_id: str, status: str, message: str, *, error: dict[str, str] | None = None
) -> None:
    with session_scope(context.session_factory) as session:
        values: dict[str, Any] = {"status": status, "finished_at": utcnow()}
        if error is not None:
            values["error"] = error
        if jobs.transition(session, job_id, "running", **values):
            jobs.add_event(session, job_id, message, level="error" if status == "failed" else "info")


def execute_job(job_id: str, context: WorkerContext | None = None) -> None:
    context = context or worker_context()
    job = _claim(context, job_id)
    if job is None:
        return
    try:
        from workers.recipes.finetune import FinetuneConfig, FinetuneRecipe, Hyperparameters

        with session_scope(context.session_factory) as session:
            config = FinetuneConfig(
                job_id=job.id,
                seed=job.seed,
                method=job.method,  # type: ignore[arg-type]
                base=_base_source(context, session, job),
                train=_dataset_source(context, session, job.training_dataset),
                validation=(
                    _dataset_source(context, session, job.validation_dataset)
                    if job.validation_dataset
                    else None
                ),
                hyperparameters=Hyperparameters.model_validate(job.hyperparameters),
            )
        reporter = DatabaseReporter(context, job)
        result = FinetuneRecipe(config, reporter).run()
        _register_result(context, job, result)
    except JobCancelled:
        _finish(context, job.id, "cancelled", "Job cancelled")
    except Exception as exc:
        log.exception("job %s failed", job.id)
        error = _error_for(exc)
        _finish(context, job.id, "failed", f"Job failed: {error['message']}", error=error)
