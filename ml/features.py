"""The feature cache of frozen backbones: a backbone's output computed once per example and reused by
every epoch, and by later jobs on the same model and data.

Entries are keyed by what determines the features: the backbone's weights (a package version or a
weights digest, plus a checkpoint's digest), the input preprocessing, the dataset's content digest and
how it was read, and the precision it was computed in. Files are safetensors, written atomically, so
concurrent jobs can share the cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from ml.runtime import to_device

FEATURE_BATCH_SIZE = 64


def cache_key(parts: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:40]


def feature_key(
    identity: dict[str, Any],
    input_spec: dict[str, Any],
    dataset_sha256: str,
    schema: dict[str, Any],
    precision: Any,
    subset: list[int] | None = None,
) -> str:
    """The cache key of a backbone's features of a dataset (of a subset of its examples, when given)."""
    parts = {
        "model": identity,
        "input_spec": input_spec,
        "dataset": dataset_sha256,
        "schema": schema,
        "precision": str(precision),
    }
    if subset is not None:
        parts["subset"] = hashlib.sha256(json.dumps(subset).encode()).hexdigest()
    return cache_key(parts)


@torch.no_grad()
def extract_features(
    model: Any,
    inputs: Any,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    on_batch: Callable[[], None] | None = None,
    *,
    backbone_only: bool = False,
) -> Tensor:
    """The model's features of every example of `inputs` (eval mode), batched in the inputs' preferred
    order (texts sorted by length, so padding stays short) and returned in example order; with
    `backbone_only`, the backbone's output before a feature adapter."""
    model.backbone.eval()
    order = inputs.inference_order()
    features = torch.empty(len(order), model.feature_dim, device=device)
    for start in range(0, len(order), FEATURE_BATCH_SIZE):
        indices = order[start : start + FEATURE_BATCH_SIZE]
        with torch.autocast(device_type=device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            prepared = to_device(inputs.batch(indices), device)
            batch = (model.backbone_features(prepared) if backbone_only else model.features(prepared)).float()
        features[torch.as_tensor(indices, device=device)] = batch
        if on_batch is not None:
            on_batch()
    return features


class FeatureCache:
    def __init__(self, root: Path) -> None:
        self.root = root

    def path(self, key: str) -> Path:
        return self.root / "features" / f"{key}.safetensors"

    def get_or_compute(self, key: str, compute: Callable[[], Tensor]) -> tuple[Tensor, bool]:
        """The cached features for `key`, computing and storing them on a miss; True when it was a hit."""
        path = self.path(key)
        if path.exists():
            try:
                return load_file(str(path))["features"], True
            except Exception:
                path.unlink(missing_ok=True)  # a damaged entry is recomputed
        features = compute()
        path.parent.mkdir(parents=True, exist_ok=True)
        temp = path.with_name(f".{uuid.uuid4().hex}.part")
        try:
            save_file({"features": features.detach().to("cpu").contiguous()}, str(temp))
            os.replace(temp, path)
        finally:
            temp.unlink(missing_ok=True)
        return features, False
