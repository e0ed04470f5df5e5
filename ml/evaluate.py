"""Evaluation of a model with a classification head on a labelled dataset (classes matched by name)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from graft.sources import DatasetSource
from graft.spec import ModelSpec
from ml.data import batches, label_indices, load_inputs
from ml.metrics import classification_metrics
from ml.networks import TransferModel
from ml.runtime import autocast_dtype, pick_device, to_device

EVAL_BATCH_SIZE = 64


@torch.no_grad()
def evaluate_model(
    model: TransferModel,
    spec: ModelSpec,
    dataset: DatasetSource,
    device: str = "auto",
    on_batch: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """`on_batch` is called after every batch (it may raise to stop: a client that went away)."""
    target_device = pick_device(device)
    model = model.to(target_device).eval()
    inputs, labels = load_inputs(dataset, spec)
    if labels is None:
        raise ValueError(f"dataset {dataset.id} has no labels to evaluate against")
    targets = label_indices(labels, spec.classes)
    amp = autocast_dtype(target_device)
    predictions = []
    for indices in batches(len(inputs), EVAL_BATCH_SIZE, shuffle=False):
        batch = to_device(inputs.batch(indices), target_device)
        with torch.autocast(device_type=target_device.type, dtype=amp, enabled=amp is not None):
            predictions.append(model(batch).float().argmax(dim=1).cpu())
        if on_batch is not None:
            on_batch()
    return classification_metrics(targets, torch.cat(predictions), spec.classes)
