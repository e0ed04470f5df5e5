"""What every run shares: the reporter it talks to and the stop signals, its config base, device, seed and
mixed-precision handling, and loading the upstream network."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict
from torch import Tensor

from graft.errors import GraftError, MissingInput, OutOfMemory, StorageFull
from graft.sources import BaseModelSource, DatasetSource
from graft.spec import ModelSpec
from graft.storage import is_disk_full
from ml.resume import Journal


class TrainingError(GraftError):
    """A run failed for a reason none of the kinds below names (the message carries the original error)."""

    status_code = 500
    code = "training_error"


def as_error(exc: BaseException) -> GraftError:
    """The typed error a failed run records: a GraftError as it is (bad data, an input the model cannot
    take), a full disk, a file gone from storage, the device out of memory, else a training error."""
    if isinstance(exc, GraftError):
        return exc
    if is_disk_full(exc):
        return StorageFull(
            "the storage volume is full (no space left on device); the checkpoints and training state written "
            "before are intact and nothing was left half-written. Free space, then start a new job from the "
            "last checkpoint"
        )
    if isinstance(exc, FileNotFoundError):
        return MissingInput(str(exc))
    if isinstance(exc, torch.OutOfMemoryError):
        return OutOfMemory(f"the device ran out of memory: {exc}"[:2000])
    return TrainingError(f"{type(exc).__name__}: {exc}"[:2000])


class JobCancelled(Exception):
    """Raised inside a recipe when the reporter says the job was cancelled."""


class JobPreempted(Exception):
    """Raised inside a recipe when its worker is shutting down: the run saves its training state and the
    job goes back to the queue."""


class LeaseLost(Exception):
    """The worker no longer holds the job's lease (the reaper requeued it, another worker took it): it
    stops at once and writes nothing more."""


def stop_signal(reporter: Reporter) -> Exception | None:
    """Why a run must stop now, if it must: the reporter's `stop_reason` (cancel, release, lease_lost)."""
    if not reporter.should_stop():
        return None
    reason = reporter.stop_reason or "cancel"
    if reason == "release":
        return JobPreempted()
    if reason == "lease_lost":
        return LeaseLost()
    return JobCancelled()


def load_upstream(base: BaseModelSource) -> tuple[Any, ModelSpec]:
    """The upstream network and its spec (whose classes are the source head's, if any)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from graft.spec import SPEC_METADATA_KEY
    from ml.methods import apply_checkpoint
    from ml.networks import build_model
    from ml.weights import load_model, read_metadata

    if base.weights_path is not None:
        spec = ModelSpec.from_metadata(read_metadata(base.weights_path)[SPEC_METADATA_KEY])
        model = load_model(base.weights_path, spec)
    else:
        spec = base.spec
        if base.checkpoints and not base.pretrained:
            # Random weights beneath: the network's shape is the one the first checkpoint was trained with
            # (a network built for its data: an mlp's columns, a resnet-small's image size).
            spec = _checkpoint_spec(base.checkpoints[0].path)
        model = build_model(spec, pretrained=base.pretrained)
    for checkpoint in base.checkpoints:
        with safe_open(str(checkpoint.path), framework="pt") as handle:
            metadata = dict(handle.metadata() or {})
        checkpoint_spec = ModelSpec.from_metadata(metadata[SPEC_METADATA_KEY])
        target = build_model(checkpoint_spec, pretrained=False)
        target.backbone.load_state_dict(model.backbone.state_dict())
        model = apply_checkpoint(target, load_file(str(checkpoint.path)), metadata)
        spec = checkpoint_spec
    return model, spec


def _checkpoint_spec(path: Path) -> ModelSpec:
    from safetensors import safe_open

    from graft.spec import SPEC_METADATA_KEY

    with safe_open(str(path), framework="pt") as handle:
        return ModelSpec.from_metadata(dict(handle.metadata() or {})[SPEC_METADATA_KEY])


class Reporter(Protocol):
    """How a recipe tells the world what it is doing. Implementations must be cheap to call per step."""

    def event(
        self, message: str, *, level: str = "info", data: dict[str, Any] | None = None, type: str = "message"
    ) -> None: ...

    def progress(self, *, epoch: int, epochs: int, step: int, total_steps: int) -> None: ...

    def metrics(self, *, epoch: int, step: int, values: dict[str, float]) -> None: ...

    def checkpoint(
        self,
        *,
        epoch: int,
        step: int,
        tensors: dict[str, Tensor],
        spec: ModelSpec,
        metrics: dict[str, float],
        metadata: dict[str, str],
        best: bool,
    ) -> None: ...

    def should_stop(self) -> bool: ...

    @property
    def stop_reason(self) -> str | None:
        """Why `should_stop` said True: "cancel" (the user asked), "release" (the worker is shutting down)
        or "lease_lost" (the job is no longer this worker's); None before."""
        ...

    @property
    def journal(self) -> Journal | None:
        """Where this run keeps its training state, to resume from (None: nowhere, it starts over)."""
        ...

    def journal_for(self, run: str, primary: bool) -> Journal | None:
        """The journal of one run of a study (None when this reporter keeps none)."""
        ...


class QuietReporter:
    """A reporter that keeps nothing, never stops and has no journal: the base of reporters that keep only
    some of it (a benchmark's timings, a test's events)."""

    stop_reason: str | None = None
    journal: Journal | None = None

    def event(
        self, message: str, *, level: str = "info", data: dict[str, Any] | None = None, type: str = "message"
    ) -> None:
        pass

    def progress(self, *, epoch: int, epochs: int, step: int, total_steps: int) -> None:
        pass

    def metrics(self, *, epoch: int, step: int, values: dict[str, float]) -> None:
        pass

    def checkpoint(
        self,
        *,
        epoch: int,
        step: int,
        tensors: dict[str, Tensor],
        spec: ModelSpec,
        metrics: dict[str, float],
        metadata: dict[str, str],
        best: bool,
    ) -> None:
        pass

    def should_stop(self) -> bool:
        return False

    def journal_for(self, run: str, primary: bool) -> Journal | None:
        return None


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


def mlp_from_scratch(base: BaseModelSource) -> bool:
    """An mlp with no learned weights: its size follows the columns of the data it is built for."""
    return base.spec.architecture == "mlp" and base.weights_path is None and not base.checkpoints


def from_scratch(base: BaseModelSource) -> bool:
    """Random weights: no weights file, no checkpoint, no package weights."""
    return base.weights_path is None and not base.checkpoints and not base.pretrained


def load_upstream_for(base: BaseModelSource, dataset: DatasetSource) -> tuple[Any, ModelSpec]:
    """`load_upstream`, except that a network from scratch whose shape follows the data is built for
    `dataset`: an mlp for its feature columns, a resnet-small for its images' size and colour."""
    from ml.networks import build_model

    if mlp_from_scratch(base):
        columns = list(dataset.schema_info["feature_columns"])
        spec = base.spec.model_copy(
            update={
                "options": {
                    "in_features": len(columns),
                    "hidden": list(base.spec.options.get("hidden") or [128, 128]),
                },
                "input_spec": {**base.spec.input_spec, "feature_columns": columns},
            }
        )
        return build_model(spec, pretrained=False), spec
    if base.spec.architecture == "resnet-small" and from_scratch(base):
        from ml.data import image_geometry

        geometry = image_geometry(dataset)
        spec = base.spec.model_copy(
            update={
                "options": {**base.spec.options, "stem_stride": geometry.stem_stride},
                "input_spec": {
                    **base.spec.input_spec,
                    "channels": geometry.channels,
                    "height": geometry.side,
                    "width": geometry.side,
                    "mean": [0.5] * geometry.channels,
                    "std": [0.5] * geometry.channels,
                },
            }
        )
        return build_model(spec, pretrained=False), spec
    return load_upstream(base)
