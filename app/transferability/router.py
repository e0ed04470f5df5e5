"""POST /v1/transferability: rank candidate upstream models for a labelled dataset before fine-tuning."""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field, field_validator
from sqlalchemy.orm import Session

from app.core.deps import ContextDep, PrincipalDep
from app.core.errors import ERROR_RESPONSES, Unprocessable
from app.core.security import Principal
from app.datasets import service as datasets
from app.models import service as models
from graft.catalog import BUILTIN_MODELS, TASK_MODALITY
from graft.sources import BaseModelSource, DatasetSource, dataset_source
from graft.spec import ModelSpec
from graft.storage import Storage
from graft.text import SafeStr

router = APIRouter(prefix="/v1/transferability", tags=["models"], responses=ERROR_RESPONSES)

Metric = Literal["logme", "hscore", "leep", "nce"]
HEAD_METRICS = ("leep", "nce")


def _all_metrics() -> list[Metric]:
    return ["logme", "hscore", "leep", "nce"]


class TransferabilityRequest(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        json_schema_extra={
            "examples": [
                {
                    "dataset": "ds_mb2kqv7gq3zd5w4bn6e2c3x1",
                    "models": ["efficientnet-lite0", "mdl_q2c7x5m8n4b6v1z3k9j0h2g4", "cnn-small"],
                    "metrics": ["logme", "leep"],
                }
            ]
        },
    )

    dataset: SafeStr = Field(
        min_length=1, max_length=64, description="A labelled dataset (the downstream task)."
    )
    models: list[SafeStr] = Field(
        min_length=1, max_length=10, description="Candidate upstream models: built-in ids or mdl_ ids."
    )
    metrics: list[Metric] = Field(
        default_factory=_all_metrics,
        min_length=1,
        description="logme and hscore score the frozen backbone's features; leep and nce the model's own source "
        "head (null for a model without one). Higher is better; compare models on one metric, not metrics with "
        "each other.",
    )
    rank_by: Metric | None = Field(
        default=None,
        description="The metric of the overall ranking (default: logme if asked for, else the first).",
    )
    max_examples: int = Field(
        default=2000,
        ge=10,
        le=20000,
        description="A larger dataset is scored on a stratified, seeded sample of this many examples.",
    )

    @field_validator("models", "metrics")
    @classmethod
    def _distinct(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError("entries must be distinct")
        return value


class ModelScores(BaseModel):
    model: str
    architecture: str
    source_head: bool = Field(description="Whether the model has a source classification head (LEEP, NCE).")
    scores: dict[str, float | None]
    ranks: dict[str, int | None] = Field(description="1 is the best, per metric.")
    examples: int
    feature_cache_hit: bool = Field(description="The features came from the linear_probe feature cache.")
    seconds: float


class TransferabilityOut(BaseModel):
    object: Literal["transferability"] = "transferability"
    dataset: str
    examples: int = Field(description="Examples scored (all of them, or the stratified sample).")
    metrics: list[str]
    rank_by: str
    ranking: list[str] = Field(description="Model ids, the most promising first, by rank_by.")
    results: list[ModelScores] = Field(description="In the order of the request.")
    seconds: float


def _candidates(
    session: Session, storage: Storage, principal: Principal, body: TransferabilityRequest
) -> tuple[DatasetSource, list[BaseModelSource], str, int, int]:
    """The dataset, the candidate models, the ranking metric, and the examples and pixels the dataset has."""
    dataset = datasets.get_dataset(session, principal, body.dataset, param="dataset")
    if not dataset.labeled:
        raise Unprocessable(
            f"dataset {dataset.id} has no labels; transferability scores need the downstream labels",
            param="dataset",
            code="dataset_unlabeled",
        )
    candidates: list[BaseModelSource] = []
    for index, model_id in enumerate(body.models):
        param = f"models.{index}"
        resolved = models.resolve(session, principal, model_id, param=param)
        if resolved.modality != TASK_MODALITY[dataset.task]:
            raise Unprocessable(
                f"{model_id} is a {resolved.modality} model and dataset {dataset.id} is {dataset.task}",
                param=param,
                code="modality_mismatch",
            )
        columns = resolved.spec.input_spec.get("feature_columns", []) if resolved.row is not None else []
        missing = [c for c in columns if c not in dataset.schema_info.get("feature_columns", [])]
        if missing:
            raise Unprocessable(
                f"dataset {dataset.id} lacks the column '{missing[0]}' that {model_id} was trained on",
                param=param,
                code="columns_mismatch",
            )
        if resolved.row is None:
            builtin = BUILTIN_MODELS[resolved.id]
            candidates.append(
                BaseModelSource(
                    id=builtin.id, spec=ModelSpec.for_builtin(builtin.id), pretrained=builtin.pretrained
                )
            )
        else:
            candidates.append(
                BaseModelSource(
                    id=resolved.id,
                    spec=resolved.spec,
                    weights_path=storage.path(resolved.row.weights_path),
                    weights_sha256=resolved.row.weights_sha256,
                )
            )
    rank_by = body.rank_by or ("logme" if "logme" in body.metrics else body.metrics[0])
    if rank_by not in body.metrics:
        raise Unprocessable(
            f"rank_by {rank_by} is not among the metrics", param="rank_by", code="invalid_request"
        )
    if rank_by in HEAD_METRICS:
        headless = [c.id for c in candidates if not c.spec.classes]
        if headless:
            raise Unprocessable(
                f"{rank_by} needs a source classification head and {headless[0]} has none; rank by logme or hscore",
                param="rank_by",
                code="invalid_request",
            )
    source = dataset_source(dataset, storage)
    return source, candidates, rank_by, dataset.num_examples, dataset.pixels or 0


@router.post(
    "",
    response_model=TransferabilityOut,
    summary="Rank upstream models for a dataset before fine-tuning",
    description=(
        "One forward pass per model over the dataset (a stratified sample of `max_examples` when larger), then "
        "the scores: LogME (You et al. 2021) and H-score (Bao et al. 2019) from the frozen backbone's features; "
        "LEEP (Nguyen et al. 2020) and NCE (Tran et al. 2019) from the model's own source classification head, "
        "so only for models that have one (fine-tuned or pretrained on a labelled source). Features are shared "
        "with the linear_probe feature cache. Answered within the request when the models' measured cost here "
        "says it takes at most `GRAFT_RANK_SYNC_SECONDS` (60 s); a larger ranking gets a 422 saying how many "
        "examples would fit."
    ),
)
async def rank(
    body: TransferabilityRequest, request: Request, context: ContextDep, principal: PrincipalDep
) -> dict[str, Any]:
    from ml.rank import rank_models

    dataset, candidates, rank_by, count, total_pixels = await context.db.read(
        _candidates, context.storage, principal, body
    )
    # Answered within the request only when it is quick enough, by the models' measured cost here and the
    # pixels the dataset's images hold (a few huge images cost as much as many small ones).
    examples = min(count, body.max_examples)
    pixels = total_pixels * examples // max(count, 1)
    server = context.model_server
    estimate = sum(
        server.load_seconds(c.spec.architecture)
        + server.costs.estimate(c.spec.architecture, examples, pixels)
        for c in candidates
    )
    limit = context.settings.rank_sync_seconds
    if estimate > limit:
        fits = max(10, int(examples * limit / estimate))
        raise Unprocessable(
            f"ranking {len(candidates)} model(s) on {examples} examples would take about {estimate:.0f} s here, "
            f"more than the {limit:.0f} s a request may take (GRAFT_RANK_SYNC_SECONDS); rank fewer models, or "
            f"set max_examples to about {fits}",
            param="max_examples",
            code="too_costly",
        )
    # The forward passes run on the compute threads, with no unit of work open, and stop if the client goes.
    return await context.compute_while_connected(
        request,
        rank_models,
        candidates,
        dataset,
        list(body.metrics),
        rank_by=rank_by,
        cache_dir=context.storage.path("cache"),
        max_examples=body.max_examples,
    )
