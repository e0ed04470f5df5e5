"""Requests and responses of POST /v1/transferability."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from graft.text import SafeStr

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
