"""Job rules: check everything a job needs before it is queued; commit the row, then send its id."""

from __future__ import annotations

import hashlib
import json
import secrets
from dataclasses import dataclass
from typing import Any

from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.core.db import after_commit
from app.core.errors import Conflict, NotFound, Unprocessable, not_found
from app.core.ids import new_id, utcnow
from app.core.queue import JobQueue
from app.core.security import Principal
from app.core.storage import Storage
from app.datasets import service as datasets
from app.jobs import repository
from app.jobs.schemas import METHOD_KEYS, AdaptJobCreate, DistillJobCreate, JobCreate, TrainingJobCreate
from app.models import service as models
from app.tables import Checkpoint, Dataset, Job
from workers.backbones.catalog import BUILTIN_MODELS, TASK_MODALITY
from workers.backbones.spec import SPEC_METADATA_KEY, ModelSpec
from workers.recipes.defaults import default_hyperparameters, epochs_for


def request_fingerprint(body: JobCreate) -> str:
    canonical = json.dumps(body.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


@dataclass
class Upstream:
    """What a job starts from, as far as the rules need to know."""

    base_model: str  # recorded on the job: a built-in id or an mdl_ id
    architecture: str
    modality: str
    has_weights: bool  # learned weights (a pretrained built-in, a registered model, a checkpoint)
    classes: list[str]  # the source head's classes; empty when there is no head
    feature_columns: list[str]


def _upstream(session: Session, storage: Storage, principal: Principal, body: TrainingJobCreate) -> Upstream:
    if body.from_checkpoint is not None:
        checkpoint = get_checkpoint(session, principal, body.from_checkpoint, param="from_checkpoint")
        source = repository.get(session, principal.project_id, checkpoint.job_id)
        assert source is not None
        if body.base_model is not None and body.base_model != source.base_model:
            raise Unprocessable(
                f"checkpoint {checkpoint.id} comes from a job on {source.base_model}, not {body.base_model}; "
                "leave base_model out",
                param="base_model",
                code="checkpoint_mismatch",
            )
        spec = _checkpoint_spec(storage, checkpoint)
        return Upstream(
            base_model=source.base_model,
            architecture=spec.architecture,
            modality=spec.modality,
            has_weights=True,
            classes=list(spec.classes),
            feature_columns=list(spec.input_spec.get("feature_columns", [])),
        )
    if body.base_model is None:
        raise Unprocessable(
            "base_model is required (or start from_checkpoint)", param="base_model", code="invalid_request"
        )
    return _model_upstream(
        session,
        principal,
        body.base_model,
        random_start=body.type == "pretrain" and body.initialization == "random",
    )


def _model_upstream(
    session: Session,
    principal: Principal,
    model_id: str,
    *,
    random_start: bool = False,
    param: str = "base_model",
) -> Upstream:
    base = models.resolve(session, principal, model_id, param=param)
    return Upstream(
        base_model=base.id,
        architecture=base.architecture,
        modality=base.modality,
        has_weights=base.pretrained and not random_start,
        classes=list(base.spec.classes),
        feature_columns=list(base.spec.input_spec.get("feature_columns", [])) if base.row is not None else [],
    )


def _checkpoint_spec(storage: Storage, checkpoint: Checkpoint) -> ModelSpec:
    from safetensors import safe_open

    with safe_open(str(storage.path(checkpoint.path)), framework="pt") as handle:
        return ModelSpec.from_metadata((handle.metadata() or {})[SPEC_METADATA_KEY])


def _check_dataset_fits(
    dataset: Dataset,
    upstream: Upstream,
    param: str,
    *,
    labelled: bool = True,
    mismatch_param: str = "base_model",
) -> None:
    if labelled and not dataset.labeled:
        raise Unprocessable(
            f"dataset {dataset.id} has no labels; training needs a labelled dataset",
            param=param,
            code="dataset_unlabeled",
        )
    if TASK_MODALITY[dataset.task] != upstream.modality:
        raise Unprocessable(
            f"{upstream.base_model} is a {upstream.modality} model and dataset {dataset.id} is {dataset.task}",
            param=mismatch_param,
            code="modality_mismatch",
        )
    missing = [c for c in upstream.feature_columns if c not in dataset.schema_info.get("feature_columns", [])]
    if missing:
        raise Unprocessable(
            f"dataset {dataset.id} lacks the column '{missing[0]}' that {upstream.base_model} was trained on",
            param=param,
            code="columns_mismatch",
        )


def resolve_hyperparameters(
    architecture: str,
    method: str,
    given: dict[str, Any],
    *,
    train_examples: int | None = None,
    fine_tunes_learned_weights: bool = False,
) -> dict[str, Any]:
    """Defaults for the architecture and method, what the client sent on top. Unless the client chose the
    epochs, a small dataset gets enough of them for a reasonable number of steps. Fine-tuning learned
    weights keeps their batch-norm statistics; pretraining and training from scratch learn them."""
    resolved = default_hyperparameters(architecture, method)
    resolved.update({key: value for key, value in given.items() if value is not None})
    if "epochs" not in given and train_examples is not None:
        resolved["epochs"] = epochs_for(resolved["epochs"], resolved["batch_size"], train_examples)
    resolved.setdefault("freeze_batch_norm", fine_tunes_learned_weights)
    return resolved


def _check_method(body: TrainingJobCreate, upstream: Upstream, given: dict[str, Any]) -> None:
    builtin = BUILTIN_MODELS[upstream.architecture]
    if body.method == "self_supervised":
        if body.type != "pretrain":
            raise Unprocessable(
                "self_supervised is a pretraining method: use it with type pretrain",
                param="method",
                code="method_not_supported",
            )
        for field in ("validation_dataset", "head"):
            if getattr(body, field) is not None:
                raise Unprocessable(
                    f"{field} does not apply to self-supervised pretraining (no labels, no head)",
                    param=field,
                    code="invalid_request",
                )
    allowed = builtin.architecture_methods if upstream.has_weights else ("full",)
    if body.method != "self_supervised" and body.method not in allowed:
        reason = (
            f"{upstream.base_model} starts from random weights, so {body.method} would train on random features"
            if not upstream.has_weights
            else f"{body.method} is not offered for {upstream.architecture}"
        )
        raise Unprocessable(
            f"{reason}; use one of: {', '.join(allowed)}", param="method", code="method_not_supported"
        )
    for key in sorted({k for keys in METHOD_KEYS.values() for k in keys} & set(given)):
        if key not in METHOD_KEYS[body.method]:
            accepting = " or ".join(m for m, keys in METHOD_KEYS.items() if key in keys)
            raise Unprocessable(
                f"{key} applies to method {accepting}, not {body.method}",
                param=f"hyperparameters.{key}",
                code="invalid_request",
            )
    blocks = given.get("unfreeze_blocks")
    if blocks is not None and blocks > builtin.num_blocks:
        raise Unprocessable(
            f"{upstream.architecture} has {builtin.num_blocks} blocks; unfreeze_blocks is {blocks}",
            param="hyperparameters.unfreeze_blocks",
            code="invalid_request",
        )


def _check_options(
    body: TrainingJobCreate, upstream: Upstream, train: Dataset, hyperparameters: dict[str, Any]
) -> dict[str, Any]:
    """Head, initialization, baseline and seeds; returns the transfer the job is expected to make."""
    if body.initialization is not None and body.type != "pretrain":
        raise Unprocessable(
            "initialization applies to pretrain jobs", param="initialization", code="invalid_request"
        )
    if body.initialization == "random" and body.base_model not in BUILTIN_MODELS:
        raise Unprocessable(
            "a random initialization needs a built-in architecture as base_model (e.g. cnn-small)",
            param="initialization",
            code="invalid_request",
        )
    if body.head == "keep":
        if not upstream.classes:
            raise Unprocessable(
                f"{upstream.base_model} has no classification head to keep",
                param="head",
                code="invalid_request",
            )
        if not set(upstream.classes) & set(train.classes):
            raise Unprocessable(
                "the base model's classes and the dataset's have no name in common; a kept head would match none",
                param="head",
                code="invalid_request",
            )
    if body.baseline:
        if body.type != "finetune":
            raise Unprocessable("baseline applies to finetune jobs", param="baseline", code="invalid_request")
        if not upstream.has_weights:
            raise Unprocessable(
                f"{upstream.base_model} has random weights: there is no transfer to compare with training from "
                "scratch",
                param="baseline",
                code="invalid_request",
            )
        if body.validation_dataset is None and not hyperparameters["validation_split"]:
            raise Unprocessable(
                "the report compares validation metrics: give a validation_dataset or a validation_split above 0",
                param="baseline",
                code="invalid_request",
            )
    if body.seeds is not None and not body.baseline:
        raise Unprocessable(
            "seeds repeat the baseline comparison; set baseline to true",
            param="seeds",
            code="invalid_request",
        )
    return _transfer(upstream, train, body.head)


def _check_companion(
    session: Session,
    principal: Principal,
    dataset_id: str,
    train: Dataset,
    upstream: Upstream,
    param: str,
    *,
    labelled: bool = True,
    classes: list[str] | None = None,
) -> Dataset:
    """A dataset used beside the training dataset (validation, target, evaluation): the same task, the
    training data's feature columns, and (when labelled) no class the model cannot predict."""
    dataset = datasets.get_dataset(session, principal, dataset_id, param=param, for_update=True)
    if dataset.task != train.task:
        raise Unprocessable(
            f"dataset {dataset.id} is {dataset.task}, the training dataset {train.task}",
            param=param,
            code="task_mismatch",
        )
    _check_dataset_fits(dataset, upstream, param, labelled=labelled)
    if train.task == "tabular_classification":
        needed = upstream.feature_columns or train.schema_info["feature_columns"]
        missing = [c for c in needed if c not in dataset.schema_info.get("feature_columns", [])]
        if missing:
            raise Unprocessable(
                f"dataset {dataset.id} lacks the feature column '{missing[0]}'",
                param=param,
                code="columns_mismatch",
            )
    if labelled:
        known = train.classes if classes is None else classes
        unknown = sorted(set(dataset.classes) - set(known))
        if unknown:
            raise Unprocessable(
                f"dataset {dataset.id} has classes the model cannot predict: {', '.join(unknown[:5])}",
                param=param,
                code="classes_mismatch",
            )
    return dataset


def _training_dataset(
    session: Session,
    principal: Principal,
    dataset_id: str,
    upstream: Upstream,
    param: str,
    *,
    labelled: bool = True,
    mismatch_param: str = "base_model",
) -> Dataset:
    train = datasets.get_dataset(session, principal, dataset_id, param=param, for_update=True)
    _check_dataset_fits(train, upstream, param, labelled=labelled, mismatch_param=mismatch_param)
    if train.num_examples < 2:
        raise Unprocessable(
            f"dataset {train.id} has {train.num_examples} example; at least 2 are needed", param=param
        )
    return train


def _budget(
    architecture: str,
    given: dict[str, Any],
    train: Dataset,
    *,
    held_out: bool,
    learned: bool,
    method: str = "full",
) -> dict[str, Any]:
    split = given.get("validation_split", default_hyperparameters(architecture, method)["validation_split"])
    train_examples = train.num_examples if held_out else int(train.num_examples * (1 - split))
    return resolve_hyperparameters(
        architecture, method, given, train_examples=train_examples, fine_tunes_learned_weights=learned
    )


def _transfer(upstream: Upstream, train: Dataset, head: str | None) -> dict[str, Any]:
    same_labels = bool(upstream.classes) and sorted(upstream.classes) == sorted(train.classes)
    keep = head == "keep" or (head is None and same_labels)
    return {"kind": "domain" if same_labels else "task", "head": "keep" if keep else "new"}


def _training_job(
    session: Session, storage: Storage, principal: Principal, body: TrainingJobCreate
) -> tuple[dict[str, Any], str]:
    upstream = _upstream(session, storage, principal, body)
    self_supervised = body.method == "self_supervised"
    train = _training_dataset(
        session, principal, body.training_dataset, upstream, "training_dataset", labelled=not self_supervised
    )
    given = body.hyperparameters.model_dump(exclude_none=True)
    _check_method(body, upstream, given)
    if body.validation_dataset is not None:
        _check_companion(session, principal, body.validation_dataset, train, upstream, "validation_dataset")
    hyperparameters = _budget(
        upstream.architecture,
        given,
        train,
        held_out=body.validation_dataset is not None,
        learned=body.type == "finetune" and upstream.has_weights,
        method=body.method,
    )
    transfer: dict[str, Any] | None = _check_options(body, upstream, train, hyperparameters)
    if self_supervised:
        transfer = None  # no head: nothing to keep or replace
    initialization = body.initialization
    if body.type == "pretrain" and initialization is None:
        initialization = "pretrained" if upstream.has_weights else "random"
    fields = {
        "type": body.type,
        "base_model": upstream.base_model,
        "training_dataset": train.id,
        "validation_dataset": body.validation_dataset,
        "method": body.method,
        "hyperparameters": hyperparameters,
        "head": body.head,
        "initialization": initialization,
        "from_checkpoint": body.from_checkpoint,
        "baseline": body.baseline,
        "seeds": body.seeds,
        "transfer": transfer,
    }
    start = f"checkpoint {body.from_checkpoint}" if body.from_checkpoint else upstream.base_model
    what = {"pretrain": "pretraining", "finetune": f"{body.method} fine-tune"}[body.type]
    if self_supervised:
        what = "self-supervised pretraining"
    return fields, f"Job created: {what} of {start} on {train.id}"


ADAPTATION_DEFAULTS = {"adaptation_weight": 1.0, "pseudo_label_threshold": 0.9, "mcc_temperature": 2.5}
DISTILLATION_DEFAULTS = {"temperature": 4.0, "alpha": 0.5}
# A student matching soft targets needs longer than fine-tuning needs to fit labels: unless the client
# chose the epochs, distillation runs this many times the architecture's (data-scaled) default.
DISTILLATION_EPOCHS_FACTOR = 3


def _adapt_job(session: Session, principal: Principal, body: AdaptJobCreate) -> tuple[dict[str, Any], str]:
    upstream = _model_upstream(session, principal, body.base_model)
    source = _training_dataset(session, principal, body.source_dataset, upstream, "source_dataset")
    target = _check_companion(
        session, principal, body.target_dataset, source, upstream, "target_dataset", labelled=False
    )
    if target.id == source.id:
        raise Unprocessable(
            "the target dataset is the source dataset: there is no domain to adapt to",
            param="target_dataset",
            code="invalid_request",
        )
    if body.evaluation_dataset is not None:
        _check_companion(session, principal, body.evaluation_dataset, source, upstream, "evaluation_dataset")
    given = body.hyperparameters.model_dump(exclude_none=True)
    hyperparameters = {
        **ADAPTATION_DEFAULTS,
        **_budget(upstream.architecture, given, source, held_out=False, learned=upstream.has_weights),
    }
    fields = {
        "type": "adapt",
        "base_model": upstream.base_model,
        "training_dataset": source.id,
        "target_dataset": target.id,
        "evaluation_dataset": body.evaluation_dataset,
        "method": "full",
        "methods": list(body.methods),
        "hyperparameters": hyperparameters,
        "seeds": body.seeds,
        "transfer": _transfer(upstream, source, None),
    }
    return fields, (
        f"Job created: adapt {upstream.base_model} from {source.id} to {target.id} with "
        f"{', '.join(body.methods)} beside source_only"
    )


STUDENT_OPTIONS = {"layers": "minilm-l6", "width": "cnn-small", "hidden": "mlp"}


def _distill_job(
    session: Session, principal: Principal, body: DistillJobCreate
) -> tuple[dict[str, Any], str]:
    teacher = _model_upstream(session, principal, body.teacher, param="teacher")
    if not teacher.classes:
        raise Unprocessable(
            f"{teacher.base_model} has no classification head to learn from; distil a fine-tuned model",
            param="teacher",
            code="invalid_request",
        )
    student = body.student
    builtin = BUILTIN_MODELS[student.architecture]
    if builtin.modality != teacher.modality:
        raise Unprocessable(
            f"the teacher is a {teacher.modality} model and {student.architecture} a {builtin.modality} one",
            param="student.architecture",
            code="modality_mismatch",
        )
    for option, architecture in STUDENT_OPTIONS.items():
        if getattr(student, option) is not None and student.architecture != architecture:
            raise Unprocessable(
                f"{option} applies to a {architecture} student, not {student.architecture}",
                param=f"student.{option}",
                code="invalid_request",
            )
    train = _training_dataset(
        session,
        principal,
        body.training_dataset,
        teacher,
        "training_dataset",
        labelled=False,
        mismatch_param="training_dataset",
    )
    unknown = sorted(set(train.classes) - set(teacher.classes)) if train.labeled else []
    if unknown:
        raise Unprocessable(
            f"dataset {train.id} has classes the teacher cannot predict: {', '.join(unknown[:5])}",
            param="training_dataset",
            code="classes_mismatch",
        )
    if body.evaluation_dataset is not None:
        _check_companion(
            session,
            principal,
            body.evaluation_dataset,
            train,
            teacher,
            "evaluation_dataset",
            classes=teacher.classes,
        )
    given = body.hyperparameters.model_dump(exclude_none=True)
    hyperparameters = {
        **DISTILLATION_DEFAULTS,
        **_budget(
            student.architecture,
            given,
            train,
            held_out=body.evaluation_dataset is not None or not train.labeled,
            learned=builtin.pretrained,
        ),
    }
    if "epochs" not in given:
        hyperparameters["epochs"] = min(hyperparameters["epochs"] * DISTILLATION_EPOCHS_FACTOR, 1000)
    if body.evaluation_dataset is None and (not train.labeled or not hyperparameters["validation_split"]):
        raise Unprocessable(
            "the report compares teacher and students on labelled data: give an evaluation_dataset, or labelled "
            "transfer data with a validation_split above 0",
            param="evaluation_dataset",
            code="invalid_request",
        )
    fields = {
        "type": "distill",
        "base_model": teacher.base_model,
        "training_dataset": train.id,
        "evaluation_dataset": body.evaluation_dataset,
        "method": "full",
        "student": student.model_dump(exclude_none=True),
        "hyperparameters": hyperparameters,
    }
    return (
        fields,
        f"Job created: distil {teacher.base_model} into a {student.architecture} student on {train.id}",
    )


def create_job(
    session: Session,
    storage: Storage,
    queue: JobQueue,
    principal: Principal,
    body: JobCreate,
    idempotency_key: str | None,
) -> tuple[Job, bool]:
    """The job, and whether it was created now (False: an earlier request with the same key made it)."""
    fingerprint = request_fingerprint(body)
    if idempotency_key is not None:
        existing = repository.by_idempotency_key(session, principal.project_id, idempotency_key)
        if existing is not None:
            return _replay(existing, fingerprint), False

    if isinstance(body, AdaptJobCreate):
        fields, description = _adapt_job(session, principal, body)
    elif isinstance(body, DistillJobCreate):
        fields, description = _distill_job(session, principal, body)
    else:
        fields, description = _training_job(session, storage, principal, body)
    job = Job(
        id=new_id("job"),
        project_id=principal.project_id,
        status="queued",
        seed=body.seed if body.seed is not None else secrets.randbelow(2**32),
        user_metadata=body.metadata,
        idempotency_key=idempotency_key,
        request_hash=fingerprint,
        cancel_requested=False,
        attempts=0,
        created_at=utcnow(),
        **fields,
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
    repository.add_event(session, job.id, description)
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


def get_checkpoint(
    session: Session, principal: Principal, checkpoint_id: str, param: str | None = None
) -> Checkpoint:
    row = repository.get_checkpoint(session, principal.project_id, checkpoint_id)
    if row is None:
        raise not_found("checkpoint", checkpoint_id, param=param)
    return row


def report_of(job: Job) -> dict[str, Any]:
    if job.report is None:
        if job.type in ("adapt", "distill"):
            reason = f"the report is written when the job succeeds; it is {job.status}"
        elif not job.baseline:
            reason = (
                "this job has no report: create it with baseline true to compare with training from scratch"
            )
        else:
            reason = f"the report is written when the job succeeds; it is {job.status}"
        raise NotFound(reason, code="report_not_available")
    report = {"job_id": job.id, "kind": "transfer", **job.report}
    if report["kind"] == "adaptation":
        # JSON columns need not keep key order (PostgreSQL's JSONB does not): source_only first, then the
        # methods as requested.
        order = ["source_only", *(job.methods or [])]
        report["methods"] = {m: report["methods"][m] for m in order if m in report["methods"]}
    return report
