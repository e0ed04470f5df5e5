"""POST /v1/models/{id}/evaluate: answered directly for a dataset small enough to score within the
request, else queued as an evaluation job whose metrics hold the same answer."""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session
from starlette.requests import Request

from app.core.deps import ServiceContext
from app.core.errors import InvalidRequest
from app.core.security import Principal
from app.datasets import service as datasets
from app.models import service as models
from app.models.fit import check_fits
from graft import job_store as jobs
from graft.catalog import BUILTIN_MODELS
from graft.compute import Network
from graft.db import after_commit
from graft.jobspec import EvaluateSpec
from graft.plan import DataFacts, plan_evaluation
from graft.queueing import JobQueue
from graft.sources import dataset_source
from graft.spec import ModelSpec
from graft.tables import Dataset, Job, Model


def _check(model: Model, dataset: Dataset) -> None:
    if not model.classes:
        raise InvalidRequest(
            f"{model.id} has no classification head to evaluate", param="model", code="model_not_servable"
        )
    check_fits(
        dataset,
        model.id,
        model.modality,
        model.spec.get("input_spec", {}).get("feature_columns", []),
        param="dataset",
        labels_for="evaluation compares predictions with them",
        classes=model.classes,
    )


def check(session: Session, principal: Principal, model_id: str, dataset_id: str) -> tuple[Model, Dataset]:
    """The model and dataset of an evaluation, once it is clear the model can score the dataset."""
    if model_id in BUILTIN_MODELS:
        raise InvalidRequest(
            f"{model_id} has no classification head; evaluate a fine-tuned model",
            param="model",
            code="model_not_servable",
        )
    model = models.get_registered(session, principal, model_id)
    dataset = datasets.get_dataset(session, principal, dataset_id, param="dataset")
    _check(model, dataset)
    return model, dataset


def answer_directly(context: ServiceContext, model: Model, dataset: Dataset) -> bool:
    """Whether the evaluation finishes within a few seconds here, by the model's measured cost per example
    and the pixels the dataset's images hold (the first time an architecture is served, a pessimistic
    estimate stands in for the measurement)."""
    settings = context.settings
    if dataset.num_examples > settings.evaluate_sync_max_examples:
        return False
    pixels = dataset.pixels or 0
    estimate = context.model_server.estimate_seconds(model, dataset.num_examples, pixels)
    return estimate <= settings.evaluate_sync_seconds


def queue_evaluation(
    session: Session, queue: JobQueue, principal: Principal, model: Model, dataset: Dataset
) -> Job:
    # Still there (a delete in between would otherwise leave the job without its dataset): locked, so a
    # delete waits for this job and then sees it.
    datasets.get_dataset(session, principal, dataset.id, param="dataset", for_update=True)
    spec = EvaluateSpec(kind="evaluate", model=model.id, dataset=dataset.id)
    network = Network.of(ModelSpec.model_validate(model.spec), classes=len(model.classes))
    plan = plan_evaluation(spec, network=network, dataset=DataFacts.of(dataset))
    job = jobs.new_job(principal.project_id, spec, seed=0, plan=plan)
    jobs.add(session, job)
    jobs.add_event(
        session,
        job.id,
        f"Job created: evaluation of {model.id} on {dataset.id} ({dataset.num_examples} examples)",
    )
    job_id = job.id
    after_commit(session, lambda: queue.send(job_id))
    return job


async def evaluate(
    context: ServiceContext, request: Request, principal: Principal, model_id: str, dataset_id: str
) -> tuple[dict[str, Any] | Job, bool]:
    """The evaluation (True) or the queued job computing it (False). A direct one stops if its client goes."""
    model, dataset = await context.db.read(check, principal, model_id, dataset_id)
    if answer_directly(context, model, dataset):
        source = dataset_source(dataset, context.storage)
        server = context.model_server
        async with server.turn(model):
            metrics = await context.compute_while_connected(
                request, server.evaluate, model, source, pixels=dataset.pixels or 0
            )
        return {"model": model.id, "dataset": dataset.id, **metrics}, True
    job = await context.db.write(queue_evaluation, context.queue, principal, model, dataset)
    return job, False
