"""A hyperparameter's bounds are declared once (graft/jobspec.py): the API's request schemas and the
resolved spec the worker reads agree on every field they share."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import BaseModel

from app.jobs.schemas import (
    AdaptHyperparametersIn,
    DistillHyperparametersIn,
    EarlyStoppingIn,
    HyperparametersIn,
    StudentIn,
)
from graft import jobspec

PAIRS = [
    (HyperparametersIn, jobspec.FinetuneHyperparameters),
    (AdaptHyperparametersIn, jobspec.AdaptHyperparameters),
    (DistillHyperparametersIn, jobspec.DistillHyperparameters),
    (StudentIn, jobspec.Student),
    (EarlyStoppingIn, jobspec.EarlyStopping),
]
# Fields whose request type is narrower by design: names the request checks as safe strings, and the
# nested early-stopping model (compared on its own above).
DIFFERENT_TYPES = {"lora_target_modules", "early_stopping"}


def _constraints(model: type[BaseModel], name: str) -> dict[str, Any]:
    schema = model.model_json_schema()["properties"][name]
    branches = [b for b in schema.get("anyOf", [schema]) if b.get("type") != "null"]
    assert len(branches) == 1, (model.__name__, name, schema)
    return {k: v for k, v in branches[0].items() if k not in ("description", "title", "default")}


@pytest.mark.parametrize(("request_model", "resolved"), PAIRS, ids=lambda m: m.__name__)
def test_request_and_resolved_share_every_bound(
    request_model: type[BaseModel], resolved: type[BaseModel]
) -> None:
    shared = set(request_model.model_fields) & set(resolved.model_fields) - DIFFERENT_TYPES
    # Every option a client may send reaches the worker (nothing it sends is dropped on the way).
    assert set(request_model.model_fields) <= set(resolved.model_fields)
    for name in sorted(shared):
        assert _constraints(request_model, name) == _constraints(resolved, name), name


def test_a_bound_is_enforced_on_both_sides() -> None:
    base = {
        "epochs": 3, "batch_size": 8, "learning_rate": 0.01, "weight_decay": 0.0, "warmup_ratio": 0.1,
        "max_grad_norm": 1.0,
    }  # fmt: skip
    jobspec.FinetuneHyperparameters.model_validate({**base, "validation_split": 0.5})
    for bad in ({"validation_split": 0.6}, {"validation_split": 0.1, "epochs": 1001}):
        with pytest.raises(ValueError):
            jobspec.FinetuneHyperparameters.model_validate({**base, "validation_split": 0.1, **bad})
        with pytest.raises(ValueError):
            HyperparametersIn.model_validate(bad)


def test_specs_are_told_apart_by_kind_and_versioned() -> None:
    spec = jobspec.parse({"kind": "evaluate", "model": "mdl_x", "dataset": "ds_y"})
    assert isinstance(spec, jobspec.EvaluateSpec) and spec.version == 1
    with pytest.raises(ValueError):
        jobspec.parse({"kind": "evaluate", "version": 2, "model": "mdl_x", "dataset": "ds_y"})
    with pytest.raises(ValueError):  # an adapt spec names its source, not a training dataset
        jobspec.parse(
            {
                "kind": "adapt", "base_model": "mlp", "training_dataset": "ds_a", "target_dataset": "ds_b",
                "backbone": "full", "method": "full", "methods": ["mmd"], "hyperparameters": {},
            }
        )  # fmt: skip
