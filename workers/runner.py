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
from app.datasets.service import dataset_source
from app.jobs import repository as jobs
from app.tables import Checkpoint, Dataset, Job, Model
from workers.backbones.catalog import BUILTIN_MODELS
from workers.backbones.spec import ModelSpec
from workers.recipes.base import BaseModelSource, CheckpointRef, DatasetSource, JobCancelled

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

    def event(
        self, message: str, *, level: str = "info", data: dict[str, Any] | None = None, type: str = "message"
    ) -> None:
        with self._session() as session:
            jobs.add_event(session, self.job_id, message, level=level, data=data, type=type)

    def progress(self, *, epoch: int, epochs: int, step: int, total_steps: int) -> None:
        now = time.monotonic()
        # The first step is always written, so a client sees training begin at once.
        if step not in (0, 1, total_steps) and now - self._last_progress < self.PROGRESS_INTERVAL:
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
        from workers.backbones.weights import save_weights

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
                if best:
                    jobs.update_fields(session, self.job_id, best_checkpoint=checkpoint_id)
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
    return dataset_source(row, context.storage)


def _model_row(session: Session, project_id: str, model_id: str) -> Model:
    row = session.scalar(select(Model).where(Model.id == model_id, Model.project_id == project_id))
    if row is None:
        raise FileNotFoundError(f"model {model_id} no longer exists")
    return row


def _base_source(context: WorkerContext, session: Session, job: Job, depth: int = 0) -> BaseModelSource:
    """The job's upstream model; a checkpoint it starts from goes on top of the model beneath it."""
    if job.from_checkpoint is not None:
        checkpoint = session.scalar(
            select(Checkpoint).where(
                Checkpoint.id == job.from_checkpoint, Checkpoint.project_id == job.project_id
            )
        )
        source_job = jobs.get_any(session, checkpoint.job_id) if checkpoint is not None else None
        if checkpoint is None or source_job is None or depth > 20:
            raise FileNotFoundError(f"checkpoint {job.from_checkpoint} no longer exists")
        beneath = _base_source(context, session, source_job, depth + 1)
        reference = CheckpointRef(path=context.storage.path(checkpoint.path), sha256=checkpoint.sha256)
        return beneath.model_copy(
            update={"id": checkpoint.id, "checkpoints": [*beneath.checkpoints, reference]}
        )
    builtin = BUILTIN_MODELS.get(job.base_model)
    if builtin is not None:
        pretrained = builtin.pretrained and job.initialization != "random"
        return BaseModelSource(id=builtin.id, spec=ModelSpec.for_builtin(builtin.id), pretrained=pretrained)
    row = _model_row(session, job.project_id, job.base_model)
    return BaseModelSource(
        id=row.id,
        spec=ModelSpec.model_validate(row.spec),
        weights_path=context.storage.path(row.weights_path),
        weights_sha256=row.weights_sha256,
    )


def _save(
    context: WorkerContext, key: str, tensors: dict[str, Any], spec: ModelSpec, extra: dict[str, str]
) -> tuple[int, str]:
    from workers.backbones.weights import save_weights

    with context.storage.atomic_path(key) as temp:
        save_weights(temp, tensors, spec, extra=extra)
        return temp.stat().st_size, sha256_file(temp)


@dataclass
class StudyOutcome:
    result: Any  # a FinetuneResult: the model to register
    report: dict[str, Any] | None


def _register_result(
    context: WorkerContext, job: Job, study: Any, *, kind: str | None = None, name: str | None = None
) -> None:
    """Save the model's weights (and a LoRA adapter on its own), then register the model and mark the job
    succeeded in one transaction."""
    from workers.recipes.methods import lora_metadata

    result = study.result
    model_id = new_id("mdl")
    folder = f"models/{model_id}"
    lineage = {"job_id": job.id, "base_model": job.base_model}
    try:
        size, digest = _save(context, f"{folder}/model.safetensors", result.state, result.spec, lineage)
        adapter_key = None
        if result.adapter is not None:
            adapter_key = f"{folder}/adapter.safetensors"
            _save(
                context,
                adapter_key,
                result.adapter,
                result.spec,
                {**lineage, **lora_metadata(result.adapter_config)},
            )
        with session_scope(context.session_factory) as session:
            dataset_name = session.scalar(select(Dataset.name).where(Dataset.id == job.training_dataset))
            if kind is None:
                kind = "pretrained" if job.type == "pretrain" else "finetuned"
            verb = "pretrained" if kind == "pretrained" else f"{job.method} fine-tuned"
            session.add(
                Model(
                    id=model_id,
                    project_id=job.project_id,
                    name=name or f"{job.base_model} {verb} on {dataset_name or job.training_dataset}",
                    kind=kind,
                    architecture=result.spec.architecture,
                    modality=result.spec.modality,
                    classes=list(result.spec.classes),
                    metrics={**result.metrics, "best_epoch": result.best_epoch},
                    spec=result.spec.model_dump(),
                    num_parameters=result.num_parameters,
                    job_id=job.id,
                    base_model=job.base_model,
                    training_dataset=job.training_dataset,
                    weights_path=f"{folder}/model.safetensors",
                    weights_bytes=size,
                    weights_sha256=digest,
                    adapter_path=adapter_key,
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
                metrics={**result.metrics, "best_epoch": result.best_epoch},
                transfer=result.transfer,
                report=study.report,
            )
            if not finished:
                raise RuntimeError(f"job {job.id} left the running state while it trained")
            jobs.add_event(
                session,
                job.id,
                f"Job succeeded; registered model {model_id} from epoch {result.best_epoch}",
                data={"model": model_id, "best_epoch": result.best_epoch},
            )
    except Exception:
        context.storage.delete_tree(folder)
        raise


def _run_self_supervised(context: WorkerContext, job: Job, reporter: DatabaseReporter) -> None:
    from workers.recipes.finetune import Hyperparameters
    from workers.recipes.self_supervised import SelfSupervisedConfig, SelfSupervisedRecipe

    with session_scope(context.session_factory) as session:
        assert job.training_dataset is not None
        config = SelfSupervisedConfig(
            job_id=job.id,
            seed=job.seed,
            base=_base_source(context, session, job),
            train=_dataset_source(context, session, job.training_dataset),
            hyperparameters=Hyperparameters.model_validate(job.hyperparameters),
        )
    result = SelfSupervisedRecipe(config, reporter).run()
    _register_result(
        context,
        job,
        StudyOutcome(result=result, report=None),
        kind="pretrained",
        name=f"{job.base_model} self-supervised on {job.training_dataset}",
    )


def _run_training(context: WorkerContext, job: Job, reporter: DatabaseReporter) -> None:
    from workers.recipes.finetune import FinetuneConfig, Hyperparameters
    from workers.recipes.transfer import run_study

    if job.method == "self_supervised":
        _run_self_supervised(context, job, reporter)
        return

    with session_scope(context.session_factory) as session:
        assert job.training_dataset is not None and job.method is not None
        config = FinetuneConfig(
            job_id=job.id,
            seed=job.seed,
            method=job.method,  # type: ignore[arg-type]
            base=_base_source(context, session, job),
            train=_dataset_source(context, session, job.training_dataset),
            validation=_dataset_source(context, session, job.validation_dataset)
            if job.validation_dataset
            else None,
            hyperparameters=Hyperparameters.model_validate(job.hyperparameters),
            head=job.head,  # type: ignore[arg-type]
            feature_cache_dir=context.storage.path("cache"),
        )
    study = run_study(config, reporter, seeds=job.seeds, baseline=job.baseline)
    _register_result(context, job, study)


def _run_adaptation(context: WorkerContext, job: Job, reporter: DatabaseReporter) -> None:
    from workers.recipes.adapt import AdaptConfig, run_adaptation
    from workers.recipes.finetune import Hyperparameters

    hp = job.hyperparameters
    with session_scope(context.session_factory) as session:
        assert job.training_dataset is not None and job.target_dataset is not None and job.methods
        config = AdaptConfig(
            job_id=job.id,
            seed=job.seed,
            method="full",
            base=_base_source(context, session, job),
            train=_dataset_source(context, session, job.training_dataset),
            target=_dataset_source(context, session, job.target_dataset),
            evaluation=_dataset_source(context, session, job.evaluation_dataset)
            if job.evaluation_dataset
            else None,
            hyperparameters=Hyperparameters.model_validate(hp),
            adaptation_weight=hp["adaptation_weight"],
            pseudo_label_threshold=hp["pseudo_label_threshold"],
            mcc_temperature=hp["mcc_temperature"],
        )
    study = run_adaptation(config, reporter, methods=job.methods, seeds=job.seeds)
    method = study.primary.method
    _register_result(
        context,
        job,
        StudyOutcome(result=study.primary.result, report=study.report),
        kind="adapted",
        name=f"{job.base_model} adapted with {method} from {job.training_dataset} to {job.target_dataset}",
    )


def _run_distillation(context: WorkerContext, job: Job, reporter: DatabaseReporter) -> None:
    from workers.recipes.distill import DistillConfig, run_distillation
    from workers.recipes.finetune import Hyperparameters

    hp = job.hyperparameters
    student = dict(job.student or {})
    architecture = student.pop("architecture")
    builtin = BUILTIN_MODELS[architecture]
    spec = ModelSpec.for_builtin(architecture).model_copy(update={"options": student})
    with session_scope(context.session_factory) as session:
        assert job.training_dataset is not None
        config = DistillConfig(
            job_id=job.id,
            seed=job.seed,
            method="full",
            base=BaseModelSource(id=f"{architecture} student", spec=spec, pretrained=builtin.pretrained),
            teacher=_base_source(context, session, job),
            train=_dataset_source(context, session, job.training_dataset),
            validation=_dataset_source(context, session, job.evaluation_dataset)
            if job.evaluation_dataset
            else None,
            hyperparameters=Hyperparameters.model_validate(hp),
            temperature=hp["temperature"],
            alpha=hp["alpha"],
        )
    study = run_distillation(config, reporter)
    _register_result(
        context,
        job,
        study,
        kind="distilled",
        name=f"{architecture} student distilled from {job.base_model} on {job.training_dataset}",
    )


def _run_evaluation(context: WorkerContext, job: Job, reporter: DatabaseReporter) -> None:
    from workers.backbones.weights import load_model
    from workers.recipes.evaluate import evaluate_model

    with session_scope(context.session_factory) as session:
        assert job.validation_dataset is not None
        row = _model_row(session, job.project_id, job.base_model)
        spec = ModelSpec.model_validate(row.spec)
        weights = context.storage.path(row.weights_path)
        dataset = _dataset_source(context, session, job.validation_dataset)
    reporter.event(f"Evaluating {row.id} on {dataset.id}")
    metrics = evaluate_model(load_model(weights, spec), spec, dataset)
    with session_scope(context.session_factory) as session:
        if jobs.transition(
            session, job.id, "running", status="succeeded", finished_at=utcnow(), metrics=metrics
        ):
            jobs.add_event(
                session,
                job.id,
                f"Evaluation done: accuracy {metrics['accuracy']:.4f}, macro-F1 {metrics['macro_f1']:.4f}",
            )


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
    reporter = DatabaseReporter(context, job)
    try:
        if job.type == "evaluate":
            _run_evaluation(context, job, reporter)
        elif job.type == "adapt":
            _run_adaptation(context, job, reporter)
        elif job.type == "distill":
            _run_distillation(context, job, reporter)
        else:
            _run_training(context, job, reporter)
    except JobCancelled:
        _finish(context, job.id, "cancelled", "Job cancelled")
    except Exception as exc:
        log.exception("job %s failed", job.id)
        error = _error_for(exc)
        _finish(context, job.id, "failed", f"Job failed: {error['message']}", error=error)
