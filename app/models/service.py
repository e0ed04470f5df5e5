"""Models: the built-in upstream models (from the catalog) and the models jobs register per project."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy.orm import Session

from app.core.errors import not_found
from app.core.pagination import paginate
from app.core.security import Principal
from app.models import repository
from graft.catalog import BUILTIN_MODELS, BuiltinModel
from graft.spec import ModelSpec
from graft.tables import Model


def builtin_view(model: BuiltinModel) -> dict[str, Any]:
    return {
        "id": model.id,
        "name": model.id,
        "owned_by": "graft",
        "builtin": True,
        "kind": "builtin",
        "architecture": model.id,
        "modality": model.modality,
        "pretrained": model.pretrained,
        "num_parameters": model.num_parameters,
        "feature_dim": model.feature_dim,
        "input_spec": model.input_spec,
        "methods": list(model.methods),
        "description": model.description,
    }


def registered_view(row: Model) -> dict[str, Any]:
    builtin = BUILTIN_MODELS[row.architecture]
    return {
        "id": row.id,
        "name": row.name,
        "owned_by": row.project_id,
        "builtin": False,
        "kind": row.kind,
        "architecture": row.architecture,
        "modality": row.modality,
        "pretrained": True,
        "num_parameters": row.num_parameters,
        "feature_dim": ModelSpec.model_validate(row.spec).feature_dim,
        "input_spec": row.spec.get("input_spec", {}),
        # Trained weights are worth every method the architecture offers.
        "methods": list(builtin.architecture_methods),
        "description": None,
        "classes": row.classes,
        "metrics": row.metrics,
        "job_id": row.job_id,
        "base_model": row.base_model,
        "training_dataset": row.training_dataset,
        "lineage": {
            "parent_model": row.base_model,
            "source_dataset": row.training_dataset,
            "job": row.job_id,
        },
        "adapter": row.adapter_path is not None,
        "config": row.spec,
        "created_at": row.created_at,
    }


def list_models(
    session: Session, principal: Principal, *, after: str | None, limit: int
) -> tuple[list[dict[str, Any]], bool]:
    """Built-in models first (catalog order), then the project's models, newest first."""
    builtins = list(BUILTIN_MODELS.values())
    if after is None:
        start, registered_after = 0, None
    elif after in BUILTIN_MODELS:
        start, registered_after = list(BUILTIN_MODELS).index(after) + 1, None
    else:
        start, registered_after = len(builtins), after
    page = [builtin_view(model) for model in builtins[start : start + limit]]
    more_builtins = start + limit < len(builtins)
    rows, has_more = paginate(
        session,
        Model,
        [Model.project_id == principal.project_id],
        after=registered_after,
        limit=max(limit - len(page), 1),
    )
    if len(page) < limit:
        page += [registered_view(row) for row in rows]
        return page, has_more
    return page, more_builtins or bool(rows)


@dataclass
class ResolvedModel:
    """A model usable as a job's base: its spec, and where its weights are (None: built-in)."""

    id: str
    architecture: str
    modality: str
    pretrained: bool
    spec: ModelSpec
    row: Model | None = None


def get_registered(session: Session, principal: Principal, model_id: str, param: str | None = None) -> Model:
    row = repository.get(session, principal.project_id, model_id)
    if row is None:
        raise not_found("model", model_id, param=param)
    return row


def resolve(session: Session, principal: Principal, model_id: str, param: str | None = None) -> ResolvedModel:
    builtin = BUILTIN_MODELS.get(model_id)
    if builtin is not None:
        return ResolvedModel(
            id=builtin.id,
            architecture=builtin.id,
            modality=builtin.modality,
            pretrained=builtin.pretrained,
            spec=ModelSpec.for_builtin(builtin.id),
        )
    row = get_registered(session, principal, model_id, param=param)
    return ResolvedModel(
        id=row.id,
        architecture=row.architecture,
        modality=row.modality,
        pretrained=True,
        spec=ModelSpec.model_validate(row.spec),
        row=row,
    )


def view(session: Session, principal: Principal, model_id: str) -> dict[str, Any]:
    builtin = BUILTIN_MODELS.get(model_id)
    if builtin is not None:
        return builtin_view(builtin)
    return registered_view(get_registered(session, principal, model_id))
