"""POST /v1/transferability: rank candidate upstream models for a labelled dataset before fine-tuning."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from app.core.deps import ContextDep, PrincipalDep
from app.core.errors import ERROR_RESPONSES
from app.transferability.schemas import TransferabilityOut, TransferabilityRequest
from app.transferability.service import candidates_for, check_cost

router = APIRouter(prefix="/v1/transferability", tags=["models"], responses=ERROR_RESPONSES)


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
        candidates_for, context.storage, principal, body
    )
    check_cost(context, candidates, count, total_pixels, body.max_examples)
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
