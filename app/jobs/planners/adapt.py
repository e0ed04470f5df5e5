"""The planner of adapt jobs (domain adaptation): the source and target datasets, the backbone choice and
its method, the defaults; its answer is an `AdaptSpec`."""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session

from app.core.errors import Unprocessable
from app.core.security import Principal
from app.jobs.planners.common import (
    BudgetLimits,
    Plan,
    adapter_width,
    backbone_for,
    check_companion,
    check_limits,
    epochs_by_default,
    labelled_training_dataset,
    model_upstream,
    resolved_budget,
    transfer_plan,
)
from app.jobs.schemas import AdaptJobCreate
from graft.defaults import (
    ADAPT_FROZEN_LEARNING_RATE,
    ADAPTATION_DEFAULTS,
    default_hyperparameters,
)
from graft.jobspec import (
    AdaptHyperparameters,
    AdaptSpec,
)
from graft.plan import DataFacts, plan_adaptation


def plan(
    session: Session, principal: Principal, body: AdaptJobCreate, limits: BudgetLimits, seed: int
) -> Plan:
    upstream = model_upstream(session, principal, body.base_model)
    source = labelled_training_dataset(session, principal, body.source_dataset, upstream, "source_dataset")
    target = check_companion(
        session, principal, body.target_dataset, source, upstream, "target_dataset", labelled=False
    )
    if target.id == source.id:
        raise Unprocessable(
            "the target dataset is the source dataset: there is no domain to adapt to",
            param="target_dataset",
            code="invalid_request",
        )
    evaluation = None
    if body.evaluation_dataset is not None:
        evaluation = check_companion(
            session, principal, body.evaluation_dataset, source, upstream, "evaluation_dataset"
        )
    given = body.hyperparameters.model_dump(exclude_none=True)
    backbone, method = backbone_for(body.backbone, upstream.architecture, upstream.has_weights)
    hyperparameters = {
        **ADAPTATION_DEFAULTS,
        **resolved_budget(
            upstream.architecture, given, source, held_out=False, learned=upstream.has_weights, method=method
        ),
        **adapter_width(backbone),
        **_adapt_rate(backbone, given),
    }
    transfer = transfer_plan(upstream, source, None)
    spec = AdaptSpec(
        kind="adapt",
        base_model=upstream.base_model,
        source_dataset=source.id,
        target_dataset=target.id,
        evaluation_dataset=body.evaluation_dataset,
        backbone=backbone,
        method=method,
        methods=list(body.methods),
        seeds=body.seeds,
        hyperparameters=AdaptHyperparameters.model_validate(hyperparameters),
    )
    runs = plan_adaptation(
        spec,
        seed,
        upstream=upstream.for_plan(
            source, len(source.classes), adapter=hyperparameters.get("adapter_hidden")
        ),
        source=DataFacts.of(source),
        target=DataFacts.of(target),
        evaluation=DataFacts.of(evaluation) if evaluation is not None else None,
    )
    check_limits(
        runs,
        limits,
        given,
        default_epochs=epochs_by_default(upstream.architecture, given, source, held_out=False, method=method),
        default_batch_size=default_hyperparameters(upstream.architecture, method)["batch_size"],
        seeds=len(body.seeds) if body.seeds else 1,
        methods=len(body.methods),
    )
    return Plan(
        spec,
        runs,
        f"Job created: adapt {upstream.base_model} from {source.id} to {target.id} with "
        f"{', '.join(body.methods)} beside source_only ({backbone} backbone)",
        transfer,
    )


def _adapt_rate(backbone: str, given: dict[str, Any]) -> dict[str, Any]:
    """An adapt job's adapter and head over frozen features train at ADAPT_FROZEN_LEARNING_RATE unless
    the client chose the rate."""
    if backbone != "frozen" or "learning_rate" in given:
        return {}
    return {"learning_rate": ADAPT_FROZEN_LEARNING_RATE}
