"""What every recipe shares: its config types, the reporter it talks to, and device/seed handling."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from workers.backbones.spec import ModelSpec


class JobCancelled(Exception):
    """Raised inside a recipe when the reporter says the job was cancelled."""


class DatasetSource(BaseModel):
    """A stored dataset as the recipe needs it: where the file is and what upload validation found."""

    id: str
    path: Path
    task: str
    format: str
    labeled: bool
    classes: list[str] = Field(default_factory=list)
    schema_info: dict[str, Any] = Field(default_factory=dict)


class BaseModelSource(BaseModel):
    """The upstream model: a built-in (weights from its package, or random) or a registered model's file."""

    id: str
    spec: ModelSpec
    weights_path: Path | None = None
    pretrained: bool = True


class Reporter(Protocol):
    """How a recipe tells the world what it is doing. Implementations must be cheap to call per step."""

    def event(self, message: str, *, level: str = "info", data: dict[str, Any] | None = None) -> None: ...

    def progress(self, *, epoch: int, epochs: int, step: int, total_steps: int) -> None: ...

    def metrics(self, *, epoch: int, step: int, values: dict[str, float]) -> None: ...

    def checkpoint(
        self, *, epoch: int, step: int, tensors: dict[str, Tensor], spec: ModelSpec, metrics: dict[str, float]
    ) -> None: ...

    def should_stop(self) -> bool: ...


class RecipeConfig(BaseModel):
    model_config = ConfigDict(arbitrary_types_allowed=True)

    job_id: str
    seed: int = 0
    device: str = "auto"


def seed_everything(seed: int) -> torch.Generator:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    generator = torch.Generator()
    generator.manual_seed(seed)
    return generator


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, dict):
        return {key: value.to(device, non_blocking=True) for key, value in batch.items()}
    return batch.to(device, non_blocking=True)


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """Mixed precision on CUDA (bf16 where the card has it, else fp16); full precision on the CPU."""
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
