from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from app.core.text import SafeStr


class ModelOut(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "object": "model",
                    "id": "mdl_q2c7x5m8n4b6v1z3k9j0h2g4",
                    "name": "minilm-l6 fine-tuned on reviews.csv",
                    "owned_by": "proj_2b4k7xq9z3m5n6p8r1t0v2w4",
                    "builtin": False,
                    "kind": "finetuned",
                    "architecture": "minilm-l6",
                    "modality": "text",
                    "pretrained": True,
                    "num_parameters": 22566146,
                    "feature_dim": 384,
                    "input_spec": {"type": "text", "max_length": 128},
                    "methods": ["full", "linear_probe"],
                    "classes": ["negative", "positive"],
                    "metrics": {"val_accuracy": 0.91, "val_loss": 0.25, "train_loss": 0.21},
                    "job_id": "job_k3m9x2c7v5b1n8z4q6w0e2r4",
                    "base_model": "minilm-l6",
                    "training_dataset": "ds_mb2kqv7gq3zd5w4bn6e2c3x1",
                    "created_at": "2026-11-27T10:05:00Z",
                }
            ]
        }
    )

    object: Literal["model"] = "model"
    id: str
    name: str
    owned_by: str = Field(description="'graft' for built-in models, else the owning project's id.")
    builtin: bool
    kind: Literal["builtin", "finetuned", "pretrained", "imported"]
    architecture: str
    modality: Literal["text", "image", "tabular"]
    pretrained: bool = Field(description="Whether the weights were learned (false: random initial weights).")
    num_parameters: int | None = Field(description="Null for mlp, whose size follows the dataset's columns.")
    feature_dim: int | None
    input_spec: dict[str, Any]
    methods: list[str] = Field(description="Fine-tuning methods this model can be the base of.")
    description: str | None = None
    classes: list[str] | None = None
    metrics: dict[str, Any] | None = None
    job_id: str | None = None
    base_model: str | None = None
    training_dataset: str | None = None
    created_at: datetime | None = None


class TextOrTabularPredictRequest(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"inputs": ["a wonderful film", "a waste of two hours"]},
                {
                    "inputs": [
                        {"sepal_length": 5.1, "sepal_width": 3.5, "petal_length": 1.4, "petal_width": 0.2}
                    ]
                },
            ]
        },
    )

    inputs: list[SafeStr] | list[dict[str, Any]] = Field(
        min_length=1, description="Texts for a text model; objects of column: number for a tabular model."
    )


class Prediction(BaseModel):
    label: str
    probabilities: dict[str, float]


class PredictResponse(BaseModel):
    object: Literal["list"] = "list"
    model: str
    predictions: list[Prediction]
