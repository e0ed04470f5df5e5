"""Classification metrics from predictions (accuracy, macro-F1, per-class precision/recall/F1 and the
confusion matrix: rows the true class, columns the predicted one, with classes named), and a model with a
classification head measured on a labelled dataset (classes matched by name)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from graft.sources import DatasetSource
from graft.spec import ModelSpec
from ml.data import batches, label_indices, load_inputs
from ml.networks import TransferModel
from ml.runtime import autocast_dtype, pick_device, to_device


def confusion_matrix(targets: Tensor, predictions: Tensor, num_classes: int) -> Tensor:
    index = targets.long() * num_classes + predictions.long()
    return torch.bincount(index, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def classification_metrics(targets: Tensor, predictions: Tensor, classes: Sequence[str]) -> dict[str, Any]:
    """Metrics over the classes present in the targets or the predictions (absent ones do not dilute
    the macro average)."""
    n = len(classes)
    matrix = confusion_matrix(targets.cpu(), predictions.cpu(), n)
    support = matrix.sum(dim=1)
    predicted = matrix.sum(dim=0)
    true_positive = matrix.diag()
    per_class: dict[str, dict[str, float | int]] = {}
    f1_scores = []
    for i, name in enumerate(classes):
        if support[i] == 0 and predicted[i] == 0:
            continue
        precision = float(true_positive[i] / predicted[i]) if predicted[i] else 0.0
        recall = float(true_positive[i] / support[i]) if support[i] else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[name] = {"precision": precision, "recall": recall, "f1": f1, "support": int(support[i])}
        f1_scores.append(f1)
    total = int(matrix.sum())
    return {
        "accuracy": float(true_positive.sum()) / total if total else 0.0,
        "macro_f1": sum(f1_scores) / len(f1_scores) if f1_scores else 0.0,
        "num_examples": total,
        "per_class": per_class,
        "confusion_matrix": {"labels": list(classes), "matrix": matrix.tolist()},
    }


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
