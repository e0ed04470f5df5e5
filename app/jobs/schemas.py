from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from app.core.text import SafeStr
from workers.recipes.defaults import defaults_table

JobStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]
JOB_STATUSES: tuple[str, ...] = ("queued", "running", "succeeded", "failed", "cancelled")
TERMINAL_STATUSES = ("succeeded", "failed", "cancelled")


class HyperparametersIn(BaseModel):
    """Every field is optional; what is left out takes the default for the base model and method."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    epochs: int | None = Field(default=None, ge=1, le=1000, description="Passes over the training data.")
    batch_size: int | None = Field(default=None, ge=1, le=4096)
    learning_rate: float | None = Field(default=None, gt=0, le=1, description="Peak learning rate (AdamW).")
    weight_decay: float | None = Field(default=None, ge=0, le=1)
    validation_split: float | None = Field(
        default=None,
        ge=0,
        le=0.5,
        description="Share of the training data held out (stratified, seeded) when no validation_dataset is given.",
    )
    warmup_ratio: float | None = Field(
        default=None, ge=0, lt=1, description="Share of steps of linear warm-up."
    )
    max_grad_norm: float | None = Field(default=None, gt=0, le=1e6, description="Gradient clipping norm.")


class JobCreate(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "type": "finetune",
                    "base_model": "minilm-l6",
                    "training_dataset": "ds_mb2kqv7gq3zd5w4bn6e2c3x1",
                    "method": "linear_probe",
                    "hyperparameters": {"epochs": 20},
                    "seed": 42,
                    "metadata": {"experiment": "baseline"},
                }
            ]
        },
    )

    type: Literal["finetune"] = Field(description="finetune: adapt an upstream model to a labelled dataset.")
    base_model: SafeStr = Field(
        min_length=1, max_length=64, description="A built-in model id or a project's mdl_ id."
    )
    training_dataset: SafeStr = Field(min_length=1, max_length=64)
    validation_dataset: SafeStr | None = Field(default=None, max_length=64)
    method: Literal["full", "linear_probe"] = Field(
        default="full",
        description="full: every weight trains. linear_probe: the backbone is frozen and a new head trains "
        "on its features (computed once per example).",
    )
    hyperparameters: HyperparametersIn = Field(default_factory=HyperparametersIn)
    seed: int | None = Field(default=None, ge=0, le=2**32 - 1, description="Random when left out; recorded.")
    metadata: dict[SafeStr, SafeStr] | None = Field(
        default=None, description="Up to 16 string pairs for your bookkeeping."
    )

    @field_validator("metadata")
    @classmethod
    def _small_metadata(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        if value is None:
            return value
        if len(value) > 16:
            raise ValueError("at most 16 keys")
        for key, item in value.items():
            if len(key) > 64 or len(item) > 512:
                raise ValueError("keys are at most 64 characters and values at most 512")
        return value


JobCreate.__doc__ = "Create a job.\n\nDefault hyperparameters:\n\n" + defaults_table()


class Progress(BaseModel):
    epoch: int
    epochs: int
    step: int
    total_steps: int


class JobError(BaseModel):
    code: str
    message: str


class JobOut(BaseModel):
    model_config = ConfigDict(
        from_attributes=True,
        json_schema_extra={
            "examples": [
                {
                    "object": "job",
                    "id": "job_k3m9x2c7v5b1n8z4q6w0e2r4",
                    "project_id": "proj_2b4k7xq9z3m5n6p8r1t0v2w4",
                    "type": "finetune",
                    "status": "running",
                    "base_model": "minilm-l6",
                    "training_dataset": "ds_mb2kqv7gq3zd5w4bn6e2c3x1",
                    "validation_dataset": None,
                    "method": "linear_probe",
                    "hyperparameters": {
                        "epochs": 30,
                        "batch_size": 32,
                        "learning_rate": 0.01,
                        "weight_decay": 0.01,
                        "validation_split": 0.1,
                        "warmup_ratio": 0.06,
                        "max_grad_norm": 1.0,
                    },
                    "seed": 42,
                    "metadata": {"experiment": "baseline"},
                    "progress": {"epoch": 12, "epochs": 30, "step": 456, "total_steps": 1140},
                    "metrics": {"epoch": 11, "train_loss": 0.31, "val_loss": 0.35, "val_accuracy": 0.88},
                    "error": None,
                    "result_model": None,
                    "cancel_requested": False,
                    "created_at": "2026-11-27T10:00:00Z",
                    "started_at": "2026-11-27T10:00:02Z",
                    "finished_at": None,
                }
            ]
        },
    )

    object: Literal["job"] = "job"
    id: str
    project_id: str
    type: str
    status: JobStatus
    base_model: str
    training_dataset: str
    validation_dataset: str | None
    method: str
    hyperparameters: dict[str, Any] = Field(description="As resolved: what you sent, defaults for the rest.")
    seed: int
    metadata: dict[str, str] | None = Field(validation_alias="user_metadata")
    progress: Progress | None
    metrics: dict[str, Any] | None = Field(description="Latest epoch's train_loss, val_loss, val_accuracy.")
    error: JobError | None
    result_model: str | None
    cancel_requested: bool
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None


class JobEventOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    object: Literal["job.event"] = "job.event"
    id: str
    type: Literal["message", "metrics"]
    level: Literal["info", "warning", "error"]
    message: str
    data: dict[str, Any] | None
    created_at: datetime


class CheckpointOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    object: Literal["checkpoint"] = "checkpoint"
    id: str
    job_id: str
    epoch: int
    step: int
    metrics: dict[str, Any]
    bytes: int
    sha256: str
    created_at: datetime
