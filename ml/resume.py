"""The training state a run resumes from after its worker died or was stopped: the trained weights (and the
best epoch's), the optimiser's moments, the scheduler, the loss scaler, every random number generator, the
position in the epoch (the epoch's shuffled order is rebuilt from the generator state it was drawn with),
and the run's history so far.

Tensors go to a safetensors file and everything else to JSON in that file's metadata: nothing is ever
unpickled, not even what Graft wrote itself.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

STATE_METADATA_KEY = "graft_training_state"
FORMAT_VERSION = 1


@dataclass
class TrainingState:
    tensors: dict[str, Tensor] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def epoch(self) -> int:
        """The epoch in progress (or the last one, when `batch` is 0 and it is done)."""
        return int(self.meta["epoch"])

    @property
    def batch(self) -> int:
        """Batches of `epoch` already trained; 0 when the state was saved at the end of epoch `epoch`."""
        return int(self.meta.get("batch", 0))

    @property
    def step(self) -> int:
        return int(self.meta["step"])

    @property
    def complete(self) -> bool:
        return bool(self.meta.get("complete", False))

    def group(self, prefix: str) -> dict[str, Tensor]:
        """The tensors saved under `prefix/`, with the prefix removed."""
        cut = len(prefix) + 1
        return {k[cut:]: v for k, v in self.tensors.items() if k.startswith(prefix + "/")}

    def put(self, prefix: str, tensors: dict[str, Tensor]) -> None:
        for name, tensor in tensors.items():
            self.tensors[f"{prefix}/{name}"] = tensor


class Journal(Protocol):
    """Where one run keeps its training state (a recipe finds it as `reporter.journal`, when there is one)."""

    def load(self) -> TrainingState | None: ...

    def save(self, state: TrainingState) -> None: ...


def save_state(path: Path, state: TrainingState) -> None:
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state.tensors.items()}
    meta = {**state.meta, "format": FORMAT_VERSION}
    save_file(tensors, str(path), metadata={STATE_METADATA_KEY: json.dumps(meta)})


def load_state(path: Path) -> TrainingState:
    with safe_open(str(path), framework="pt", device="cpu") as handle:
        metadata = handle.metadata() or {}
        if STATE_METADATA_KEY not in metadata:
            raise ValueError(f"{path.name} is not a training state")
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    meta = json.loads(metadata[STATE_METADATA_KEY])
    if meta.get("format") != FORMAT_VERSION:
        raise ValueError(f"training state format {meta.get('format')} is not supported")
    return TrainingState(tensors=tensors, meta=meta)


# ------------------------------------------------------------------------------------------ optimiser


def optimizer_state(optimizer: torch.optim.Optimizer) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The optimiser's state as (tensors, JSON): per-parameter moments as tensors, the rest as JSON."""
    state = optimizer.state_dict()
    tensors: dict[str, Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, values in state["state"].items():
        for name, value in values.items():
            if isinstance(value, Tensor):
                tensors[f"{index}/{name}"] = value
            else:
                scalars.setdefault(str(index), {})[name] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def restore_optimizer(
    optimizer: torch.optim.Optimizer, tensors: dict[str, Tensor], meta: dict[str, Any]
) -> None:
    per_param: dict[int, dict[str, Any]] = {}
    for key, tensor in tensors.items():
        index, name = key.split("/", 1)
        per_param.setdefault(int(index), {})[name] = tensor
    for index, values in meta["scalars"].items():
        per_param.setdefault(int(index), {}).update(values)
    optimizer.load_state_dict({"state": per_param, "param_groups": meta["param_groups"]})


# ------------------------------------------------------------------------------------------ randomness


def rng_state(generator: torch.Generator) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Every generator a run draws from: its own (data order), torch's global one (dropout, augmentation),
    CUDA's, numpy's and Python's."""
    tensors = {"generator": generator.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, cuda_state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda{i}"] = cuda_state
    kind, keys, position, has_gauss, cached = np.random.get_state(legacy=True)  # type: ignore[misc]
    assert isinstance(keys, np.ndarray)
    version, internal, gauss = random.getstate()
    meta = {
        "numpy": [kind, keys.tolist(), int(position), int(has_gauss), float(cached)],
        "python": [version, list(internal), gauss],
    }
    return tensors, meta


def restore_rng(generator: torch.Generator, tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
    generator.set_state(tensors["generator"])
    torch.set_rng_state(tensors["torch"])
    cuda = [
        tensors[k] for k in sorted((k for k in tensors if k.startswith("cuda")), key=lambda k: int(k[4:]))
    ]
    if cuda and torch.cuda.is_available():
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
        else:  # resumed on a machine with another number of GPUs: the device in use continues its stream
            torch.cuda.set_rng_state(cuda[0])
    kind, keys, position, has_gauss, cached = meta["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), position, has_gauss, cached))
    version, internal, gauss = meta["python"]
    random.setstate((version, tuple(internal), gauss))
