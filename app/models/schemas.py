from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt

from graft.text import SafeStr


class Lineage(BaseModel):
    parent_model: str | None = Field(description="The model it was trained from (null: imported).")
    source_dataset: str | None = Field(description="The dataset it was trained on.")
    job: str | None = Field(description="The job that trained it.")


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
                    "methods": ["full", "linear_probe", "partial", "lora"],
                    "classes": ["negative", "positive"],
                    "metrics": {"val_accuracy": 0.91, "val_loss": 0.25, "train_loss": 0.21},
                    "job_id": "job_k3m9x2c7v5b1n8z4q6w0e2r4",
                    "base_model": "minilm-l6",
                    "training_dataset": "ds_mb2kqv7gq3zd5w4bn6e2c3x1",
                    "lineage": {
                        "parent_model": "minilm-l6",
                        "source_dataset": "ds_mb2kqv7gq3zd5w4bn6e2c3x1",
                        "job": "job_k3m9x2c7v5b1n8z4q6w0e2r4",
                    },
                    "adapter": False,
                    "config": {
                        "architecture": "minilm-l6",
                        "modality": "text",
                        "classes": ["negative", "positive"],
                        "input_spec": {"type": "text", "max_length": 128},
                        "options": {},
                    },
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
    kind: Literal["builtin", "finetuned", "pretrained", "adapted", "distilled", "imported"] = Field(
        description="pretrained: an upstream model from a pretrain job; finetuned: a downstream model; adapted: a model adapted to an unlabelled target domain; distilled: a distilled student; imported: uploaded weights."
    )
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
    lineage: Lineage | None = Field(default=None, description="Where a registered model comes from.")
    adapter: bool = Field(default=False, description="A LoRA adapter can be downloaded on its own.")
    config: dict[str, Any] | None = Field(
        default=None,
        description="What loading the weights needs: architecture, classes (head order), input_spec, options.",
    )
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
    ignored_columns: list[str] = Field(
        default_factory=list,
        description="Tabular models: columns of the inputs the model does not read (it reads its "
        "`feature_columns`; a row's label column, say): they did not change the predictions. At most 20 named.",
    )


class ImportConfig(BaseModel):
    """The `config` part of a model import. Its shape is checked here; its values by the validation a
    weights file's embedded config (graft_spec) goes through too (app.models.importing.validate_spec),
    with the limits said below."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [{"architecture": "cnn-small", "classes": ["cat", "dog"], "name": "pets v2"}]
        },
    )

    architecture: Literal["minilm-l6", "efficientnet-lite0", "resnet-small", "cnn-small", "mlp"]
    classes: list[SafeStr] = Field(
        default_factory=list,
        description="Head classes in row order: distinct, 2 to GRAFT_MAX_CLASSES (1000), each at most "
        "GRAFT_MAX_CLASS_CHARS (200) characters; empty: a bare backbone.",
    )
    name: SafeStr | None = Field(default=None, max_length=300)
    feature_columns: list[SafeStr] | None = Field(
        default=None,
        description="mlp: input columns in order: distinct, at most 10,000, each at most "
        "GRAFT_MAX_COLUMN_CHARS (200) characters.",
    )
    hidden: list[StrictInt] | None = Field(
        default=None, description="mlp: hidden layer sizes, 1 to 8 layers of 1 to 4096 ([128, 128])."
    )
    layers: StrictInt | None = Field(
        default=None,
        description="minilm-l6: transformer layers, 1 to 6 (6; fewer for a distilled student's weights).",
    )
    width: StrictInt | None = Field(
        default=None, description="cnn-small, resnet-small: channels of the first block, 4 to 256 (32)."
    )
    max_length: StrictInt | None = Field(
        default=None, description="minilm-l6: tokens per text, 8 to 512 (128)."
    )


class EvaluateRequest(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        json_schema_extra={"examples": [{"dataset": "ds_mb2kqv7gq3zd5w4bn6e2c3x1"}]},
    )

    dataset: SafeStr = Field(
        min_length=1, max_length=64, description="A labelled dataset whose classes the model knows."
    )


class Evaluation(BaseModel):
    object: Literal["evaluation"] = "evaluation"
    model: str
    dataset: str
    num_examples: int
    accuracy: float
    macro_f1: float
    per_class: dict[str, dict[str, float | int]] = Field(
        description="precision, recall, f1, support per class."
    )
    confusion_matrix: dict[str, Any] = Field(
        description="labels, and matrix: rows are true classes, columns predictions."
    )
