"""One handler per job kind: read the job's spec (graft/jobspec.py), resolve its inputs (datasets and
models to files), build its recipe's config, run it, and register what it made.

The runner (workers/runner.py) claims the job, keeps its lease and reporter and ends it; a handler only
turns a spec into a recipe run. Adding a job kind: its spec in graft/jobspec.py, its planner in
app/jobs/service.py, its handler here (in HANDLERS) and its recipe in workers/recipes/.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from graft import job_store as jobs
from graft.catalog import BUILTIN_MODELS
from graft.db import session_scope
from graft.ids import new_id, utcnow
from graft.jobspec import AdaptSpec, DistillSpec, EvaluateSpec, JobSpec, TrainingSpec
from graft.plan import (
    DataFacts,
    JobPlan,
    plan_adaptation,
    plan_distillation,
    plan_evaluation,
    plan_training,
)
from graft.plan import Upstream as PlanUpstream
from graft.sources import BaseModelSource, CheckpointRef, DatasetSource, dataset_source
from graft.spec import ModelSpec
from graft.storage import sha256_file
from graft.tables import Checkpoint, Dataset, Job, Model
from ml.runtime import LeaseLost
from workers.runner import DatabaseReporter, WorkerContext, state_folder


def _dataset(context: WorkerContext, session: Session, dataset_id: str) -> DatasetSource:
    row = session.scalar(select(Dataset).where(Dataset.id == dataset_id))
    if row is None:
        raise FileNotFoundError(f"dataset {dataset_id} was deleted")
    return dataset_source(row, context.storage)


def _optional_dataset(
    context: WorkerContext, session: Session, dataset_id: str | None
) -> DatasetSource | None:
    return _dataset(context, session, dataset_id) if dataset_id else None


def _model_row(session: Session, project_id: str, model_id: str) -> Model:
    row = session.scalar(select(Model).where(Model.id == model_id, Model.project_id == project_id))
    if row is None:
        raise FileNotFoundError(f"model {model_id} no longer exists")
    return row


def _model_source(
    context: WorkerContext, session: Session, project_id: str, model_id: str
) -> BaseModelSource:
    """A built-in (its package weights) or a project's model (its weights file) as a run's upstream."""
    builtin = BUILTIN_MODELS.get(model_id)
    if builtin is not None:
        return BaseModelSource(
            id=builtin.id, spec=ModelSpec.for_builtin(builtin.id), pretrained=builtin.pretrained
        )
    row = _model_row(session, project_id, model_id)
    return BaseModelSource(
        id=row.id,
        spec=ModelSpec.model_validate(row.spec),
        weights_path=context.storage.existing(row.weights_path, f"the weights file of model {row.id}"),
        weights_sha256=row.weights_sha256,
    )


def student_source(spec: DistillSpec) -> BaseModelSource:
    """A distill job's student as it starts: its built-in architecture with the options asked for (random
    weights, or the package's for a pretrained built-in)."""
    architecture = spec.student.architecture
    student = ModelSpec.for_builtin(architecture).model_copy(update={"options": spec.student.options()})
    return BaseModelSource(
        id=f"{architecture} student", spec=student, pretrained=BUILTIN_MODELS[architecture].pretrained
    )


def _checkpoint_base(
    context: WorkerContext, session: Session, project_id: str, spec: JobSpec, depth: int
) -> BaseModelSource:
    """The network beneath the checkpoints of a job of `spec`: a distill job's student, else its upstream."""
    if isinstance(spec, DistillSpec):
        return student_source(spec)
    return _upstream(context, session, project_id, spec, depth)


def _upstream(
    context: WorkerContext, session: Session, project_id: str, spec: JobSpec, depth: int = 0
) -> BaseModelSource:
    """The upstream a job's runs start from; a checkpoint it starts from goes on top of the network beneath
    it (found from the spec of the job that wrote the checkpoint)."""
    if isinstance(spec, TrainingSpec) and spec.from_checkpoint is not None:
        checkpoint = session.scalar(
            select(Checkpoint).where(
                Checkpoint.id == spec.from_checkpoint, Checkpoint.project_id == project_id
            )
        )
        source_job = jobs.get_any(session, checkpoint.job_id) if checkpoint is not None else None
        if checkpoint is None or source_job is None or depth > 20:
            raise FileNotFoundError(f"checkpoint {spec.from_checkpoint} no longer exists")
        beneath = _checkpoint_base(context, session, project_id, jobs.spec_of(source_job), depth + 1)
        path = context.storage.existing(checkpoint.path, f"the file of checkpoint {checkpoint.id}")
        reference = CheckpointRef(path=path, sha256=checkpoint.sha256)
        return beneath.model_copy(
            update={"id": checkpoint.id, "checkpoints": [*beneath.checkpoints, reference]}
        )
    model_id = spec.upstream
    source = _model_source(context, session, project_id, model_id)
    if isinstance(spec, TrainingSpec) and spec.initialization == "random" and model_id in BUILTIN_MODELS:
        return source.model_copy(update={"pretrained": False})
    return source


def _baseline_arms(
    context: WorkerContext, session: Session, project_id: str, spec: TrainingSpec
) -> list[Any]:
    """The arms the job's baseline named beside scratch, with the upstream each trains from."""
    from workers.recipes.study import Arm

    arms: list[Any] = []
    for name in spec.baseline_arms or []:
        if name == "scratch":
            continue
        if name == "as_is":
            arms.append(Arm(name=name, kind="as_is"))
            continue
        model_id = name
        if name == "parent":
            row = _model_row(session, project_id, spec.base_model)
            assert row.base_model is not None
            model_id = row.base_model
        base = _model_source(context, session, project_id, model_id)
        if model_id in BUILTIN_MODELS:
            base = base.model_copy(update={"pretrained": True})
        arms.append(Arm(name=name, kind="parent" if name == "parent" else "model", base=base))
    return arms


def plan_of(context: WorkerContext, session: Session, job: Job, spec: JobSpec) -> JobPlan:
    """The runs the job makes: the plan the API made, priced and checked, when the job was created. A job
    stored before plans were gets one now, from its spec and its data, with the same planner (unpriced:
    it was accepted already)."""
    if job.plan is not None:
        return JobPlan.model_validate(job.plan)

    def facts(dataset_id: str | None) -> DataFacts | None:
        row = session.scalar(select(Dataset).where(Dataset.id == dataset_id)) if dataset_id else None
        return DataFacts.of(row) if row is not None else None

    def required(dataset_id: str) -> DataFacts:
        found = facts(dataset_id)
        if found is None:
            raise FileNotFoundError(f"dataset {dataset_id} was deleted")
        return found

    if isinstance(spec, EvaluateSpec):
        return plan_evaluation(spec, network=None, dataset=required(spec.dataset))
    if isinstance(spec, DistillSpec):
        student = student_source(spec)
        return plan_distillation(
            spec,
            job.seed,
            teacher=None,
            student=PlanUpstream(
                id=student.id, learned=student.pretrained, architecture=spec.student.architecture
            ),
            train=required(spec.training_dataset),
            labelled=bool(session.scalar(select(Dataset.labeled).where(Dataset.id == spec.training_dataset))),
            evaluation=facts(spec.evaluation_dataset),
        )
    base = _upstream(context, session, job.project_id, spec)
    upstream = PlanUpstream(id=base.id, learned=base.learned, architecture=base.spec.architecture)
    if isinstance(spec, AdaptSpec):
        return plan_adaptation(
            spec,
            job.seed,
            upstream=upstream,
            source=required(spec.source_dataset),
            target=required(spec.target_dataset),
            evaluation=facts(spec.evaluation_dataset),
        )
    named = {
        name: PlanUpstream(id=name, learned=True, architecture=upstream.architecture)
        for name in spec.baseline_arms or []
        if name not in ("scratch", "as_is")
    }
    return plan_training(
        spec,
        job.seed,
        upstream=upstream,
        train=required(spec.training_dataset),
        validation=facts(spec.validation_dataset),
        evaluation=facts(spec.evaluation_dataset),
        unlabeled=facts(spec.unlabeled_dataset),
        named=named,
    )


def _save(
    context: WorkerContext, key: str, tensors: dict[str, Any], spec: ModelSpec, extra: dict[str, str]
) -> tuple[int, str]:
    from ml.weights import save_weights

    with context.storage.atomic_path(key) as temp:
        save_weights(temp, tensors, spec, extra=extra)
        return temp.stat().st_size, sha256_file(temp)


@dataclass
class StudyOutcome:
    result: Any  # a FinetuneResult: the model to register
    report: dict[str, Any] | None


def _register_result(
    context: WorkerContext,
    job: Job,
    reporter: DatabaseReporter,
    study: Any,
    *,
    kind: str,
    name: str,
    upstream: str,
    training_dataset: str,
) -> None:
    """Save the model's weights (and a LoRA adapter on its own), then register the model and mark the job
    succeeded in one transaction."""
    from ml.methods import lora_metadata

    result = study.result
    model_id = new_id("mdl")
    folder = f"models/{model_id}"
    lineage = {"job_id": job.id, "base_model": upstream}
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

        def work(session: Session) -> None:
            if jobs.result_model(session, job.id) == model_id:
                return  # an earlier try committed, but its acknowledgement was lost
            dataset_name = session.scalar(select(Dataset.name).where(Dataset.id == training_dataset))
            session.add(
                Model(
                    id=model_id,
                    project_id=job.project_id,
                    name=name.replace("{dataset}", dataset_name or training_dataset),
                    kind=kind,
                    architecture=result.spec.architecture,
                    modality=result.spec.modality,
                    classes=list(result.spec.classes),
                    metrics={**result.metrics, "best_epoch": result.best_epoch},
                    spec=result.spec.model_dump(),
                    num_parameters=result.num_parameters,
                    job_id=job.id,
                    base_model=upstream,
                    training_dataset=training_dataset,
                    weights_path=f"{folder}/model.safetensors",
                    weights_bytes=size,
                    weights_sha256=digest,
                    adapter_path=adapter_key,
                    created_at=utcnow(),
                )
            )
            finished = jobs.succeed(
                session,
                job.id,
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

        reporter.write(work)
        context.storage.delete_tree(state_folder(job.id))
    except DBAPIError:
        raise  # whether the last commit landed is unknown: the files stay
    except LeaseLost:
        with session_scope(context.session_factory) as session:
            landed = jobs.result_model(session, job.id) == model_id
        if landed:  # a retry after a commit whose acknowledgement was lost: the job is done
            return
        context.storage.delete_tree(folder)
        raise
    except BaseException:
        context.storage.delete_tree(folder)
        raise


def _self_supervised(
    context: WorkerContext, job: Job, spec: TrainingSpec, reporter: DatabaseReporter
) -> None:
    from workers.recipes.self_supervised import SelfSupervisedConfig, SelfSupervisedRecipe
    from workers.recipes.study import RunReporter

    with session_scope(context.session_factory) as session:
        (run,) = plan_of(context, session, job, spec).runs()
        config = SelfSupervisedConfig(
            job_id=job.id,
            seed=run.seed,
            base=_upstream(context, session, job.project_id, spec),
            train=_dataset(context, session, spec.training_dataset),
            hyperparameters=type(spec.hyperparameters).model_validate(run.hyperparameters),
        )
    result = SelfSupervisedRecipe(config, RunReporter(reporter, run.name, 0, 1, primary=True)).run()
    _register_result(
        context,
        job,
        reporter,
        StudyOutcome(result=result, report=None),
        kind="pretrained",
        name=f"{spec.base_model} self-supervised on {spec.training_dataset}",
        upstream=spec.upstream,
        training_dataset=spec.training_dataset,
    )


def train(context: WorkerContext, job: Job, spec: TrainingSpec, reporter: DatabaseReporter) -> None:
    """finetune and pretrain: the study (the transferred model, its baseline arms and seeds)."""
    from workers.recipes.finetune import FinetuneConfig
    from workers.recipes.study import run_study

    if spec.method == "self_supervised":
        _self_supervised(context, job, spec, reporter)
        return
    hp = spec.hyperparameters
    with session_scope(context.session_factory) as session:
        config = FinetuneConfig(
            job_id=job.id,
            seed=job.seed,
            method=spec.method,
            base=_upstream(context, session, job.project_id, spec),
            train=_dataset(context, session, spec.training_dataset),
            validation=_optional_dataset(context, session, spec.validation_dataset),
            evaluation=_optional_dataset(context, session, spec.evaluation_dataset),
            hyperparameters=hp,
            head=spec.head,
            feature_cache_dir=context.storage.path("cache"),
        )
        if spec.unlabeled_dataset:
            from workers.recipes.semi_supervised import SemiSupervisedConfig

            assert hp.unlabeled_weight is not None and hp.confidence_threshold is not None
            assert hp.unlabeled_ratio is not None  # the planner resolves all three with the dataset
            config = SemiSupervisedConfig(
                **dict(config),
                unlabeled=_dataset(context, session, spec.unlabeled_dataset),
                unlabeled_weight=hp.unlabeled_weight,
                confidence_threshold=hp.confidence_threshold,
                unlabeled_ratio=hp.unlabeled_ratio,
            )
        arms = _baseline_arms(context, session, job.project_id, spec)
        plan = plan_of(context, session, job, spec)
    study = run_study(config, reporter, plan, arms=arms)
    kind = "pretrained" if spec.kind == "pretrain" else "finetuned"
    verb = "pretrained" if kind == "pretrained" else f"{spec.method} fine-tuned"
    _register_result(
        context,
        job,
        reporter,
        study,
        kind=kind,
        name=f"{spec.base_model} {verb} on {{dataset}}",
        upstream=spec.upstream,
        training_dataset=spec.training_dataset,
    )


def adapt(context: WorkerContext, job: Job, spec: AdaptSpec, reporter: DatabaseReporter) -> None:
    """adapt: source_only and one run per adaptation method, per seed."""
    from workers.recipes.adapt import AdaptConfig, run_adaptation

    hp = spec.hyperparameters
    with session_scope(context.session_factory) as session:
        config = AdaptConfig(
            job_id=job.id,
            seed=job.seed,
            method=spec.method,
            base=_upstream(context, session, job.project_id, spec),
            train=_dataset(context, session, spec.source_dataset),
            target=_dataset(context, session, spec.target_dataset),
            evaluation=_optional_dataset(context, session, spec.evaluation_dataset),
            hyperparameters=hp,
            adaptation_weight=hp.adaptation_weight,
            pseudo_label_threshold=hp.pseudo_label_threshold,
            mcc_temperature=hp.mcc_temperature,
            adapter=hp.adapter_hidden,
            feature_cache_dir=context.storage.path("cache"),
        )
        plan = plan_of(context, session, job, spec)
    study = run_adaptation(config, reporter, plan)
    method = study.primary.method
    _register_result(
        context,
        job,
        reporter,
        StudyOutcome(result=study.primary.result, report=study.report),
        kind="adapted",
        name=f"{spec.base_model} adapted with {method} from {spec.source_dataset} to {spec.target_dataset}",
        upstream=spec.upstream,
        training_dataset=spec.source_dataset,
    )


def distill(context: WorkerContext, job: Job, spec: DistillSpec, reporter: DatabaseReporter) -> None:
    """distill: the student on the teacher's outputs, beside a student of the same size from scratch."""
    from workers.recipes.distill import DistillConfig, run_distillation

    hp = spec.hyperparameters
    architecture = spec.student.architecture
    with session_scope(context.session_factory) as session:
        config = DistillConfig(
            job_id=job.id,
            seed=job.seed,
            method=spec.method,
            base=student_source(spec),
            teacher=_upstream(context, session, job.project_id, spec),
            train=_dataset(context, session, spec.training_dataset),
            validation=_optional_dataset(context, session, spec.evaluation_dataset),
            hyperparameters=hp,
            temperature=hp.temperature,
            alpha=hp.alpha,
            adapter=hp.adapter_hidden,
            feature_cache_dir=context.storage.path("cache"),
        )
        plan = plan_of(context, session, job, spec)
    study = run_distillation(config, reporter, plan)
    _register_result(
        context,
        job,
        reporter,
        study,
        kind="distilled",
        name=f"{architecture} student distilled from {spec.teacher} on {spec.training_dataset}",
        upstream=spec.upstream,
        training_dataset=spec.training_dataset,
    )


def evaluate(context: WorkerContext, job: Job, spec: EvaluateSpec, reporter: DatabaseReporter) -> None:
    """evaluate: a registered model's metrics on a labelled dataset."""
    from ml.metrics import evaluate_model
    from ml.weights import load_model

    with session_scope(context.session_factory) as session:
        row = _model_row(session, job.project_id, spec.model)
        model_spec = ModelSpec.model_validate(row.spec)
        weights = context.storage.existing(row.weights_path, f"the weights file of model {row.id}")
        dataset = _dataset(context, session, spec.dataset)
    reporter.event(f"Evaluating {row.id} on {dataset.id}")
    metrics = evaluate_model(load_model(weights, model_spec), model_spec, dataset)

    def work(session: Session) -> None:
        jobs.succeed(session, job.id, metrics=metrics)
        jobs.add_event(
            session,
            job.id,
            f"Evaluation done: accuracy {metrics['accuracy']:.4f}, macro-F1 {metrics['macro_f1']:.4f}",
        )

    reporter.write(work)


HANDLERS: dict[type[Any], Callable[[WorkerContext, Job, Any, DatabaseReporter], None]] = {
    TrainingSpec: train,
    AdaptSpec: adapt,
    DistillSpec: distill,
    EvaluateSpec: evaluate,
}


def handle(context: WorkerContext, job: Job, spec: JobSpec, reporter: DatabaseReporter) -> None:
    HANDLERS[type(spec)](context, job, spec, reporter)
