"""The rules of POST /v1/transferability: which dataset and candidate models, which metric ranks them, and
whether the ranking is quick enough to answer within the request."""

from __future__ import annotations

from sqlalchemy.orm import Session

from app.core.deps import ServiceContext
from app.core.errors import Unprocessable
from app.core.security import Principal
from app.datasets import service as datasets
from app.models import service as models
from app.models.fit import check_fits
from app.transferability.schemas import HEAD_METRICS, TransferabilityRequest
from graft.catalog import BUILTIN_MODELS
from graft.sources import BaseModelSource, DatasetSource, dataset_source
from graft.spec import ModelSpec
from graft.storage import Storage


def candidates_for(
    session: Session, storage: Storage, principal: Principal, body: TransferabilityRequest
) -> tuple[DatasetSource, list[BaseModelSource], str, int, int]:
    """The dataset, the candidate models, the ranking metric, and the examples and pixels the dataset has."""
    dataset = datasets.get_dataset(session, principal, body.dataset, param="dataset")
    candidates: list[BaseModelSource] = []
    for index, model_id in enumerate(body.models):
        param = f"models.{index}"
        resolved = models.resolve(session, principal, model_id, param=param)
        columns = resolved.spec.input_spec.get("feature_columns", []) if resolved.row is not None else []
        check_fits(
            dataset,
            model_id,
            resolved.modality,
            columns,
            param=param,
            labels_param="dataset",
            labels_for="transferability scores need the downstream labels",
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
                    weights_path=storage.existing(
                        resolved.row.weights_path, f"the weights file of model {resolved.id}"
                    ),
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


def check_cost(
    context: ServiceContext,
    candidates: list[BaseModelSource],
    count: int,
    total_pixels: int,
    max_examples: int,
) -> None:
    """Answered within the request only when it is quick enough, by the models' measured cost here and the
    pixels the dataset's images hold (a few huge images cost as much as many small ones); else a 422 saying
    how many examples would fit."""
    examples = min(count, max_examples)
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
