"""Weights travel as safetensors with the ModelSpec in the file's metadata; nothing is ever unpickled."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

from graft.spec import SPEC_METADATA_KEY, ModelSpec
from ml.networks import TransferModel, build_model


def state_for_saving(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """Detached, contiguous CPU copies (safetensors refuses shared or strided storage)."""
    return {name: t.detach().to("cpu").contiguous().clone() for name, t in tensors.items()}


def save_weights(
    path: Path, tensors: dict[str, Tensor], spec: ModelSpec, extra: dict[str, str] | None = None
) -> None:
    metadata = {SPEC_METADATA_KEY: spec.to_metadata(), **(extra or {})}
    save_file(state_for_saving(tensors), str(path), metadata=metadata)


def read_metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as handle:
        return dict(handle.metadata() or {})


def load_model(
    path: Path, spec: ModelSpec | None = None, device: str | torch.device = "cpu"
) -> TransferModel:
    """Rebuild the network from its spec (no package weights) and load every tensor from the file."""
    if spec is None:
        spec = ModelSpec.from_metadata(read_metadata(path)[SPEC_METADATA_KEY])
    model = build_model(spec, pretrained=False)
    model.load_state_dict(load_file(str(path), device=str(device)), strict=True)
    return model.to(device)
