"""Rank candidate upstream models for a labelled dataset before fine-tuning any of them.

One forward pass per model over the dataset (or a stratified sample of it): the frozen backbone's features
feed the feature metrics (LogME, H-score); the model's own source head, where it has one, turns the same
features into the source-class probabilities that LEEP and NCE need. Features go through the linear_probe
feature cache, with the same keys, so a probe after a ranking (or a ranking after a probe) reuses them.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from graft.errors import NonFiniteOutput
from graft.sources import BaseModelSource, DatasetSource
from ml import transferability
from ml.data import Subset, label_indices, load_inputs, stratified_split
from ml.features import FeatureCache, extract_features, feature_key
from ml.runtime import autocast_dtype, load_upstream_for, pick_device


def sample(labels: torch.Tensor, max_examples: int, seed: int) -> list[int] | None:
    """A stratified, seeded sample of at most `max_examples` (None: every example)."""
    if len(labels) <= max_examples:
        return None
    _, chosen = stratified_split(labels, max_examples / len(labels), seed)
    return chosen[:max_examples]


@torch.no_grad()
def score_model(
    base: BaseModelSource,
    dataset: DatasetSource,
    metrics: list[str],
    *,
    cache_dir: Path | None,
    max_examples: int,
    seed: int = 0,
    device: str = "auto",
    on_batch: Callable[[], None] | None = None,
) -> dict[str, Any]:
    started = time.perf_counter()
    target_device = pick_device(device)
    amp = autocast_dtype(target_device)
    model, spec = load_upstream_for(base, dataset)
    model = model.to(target_device).eval()
    inputs, labels = load_inputs(dataset, spec)
    if labels is None:
        raise ValueError(f"dataset {dataset.id} has no labels")
    targets = label_indices(labels, dataset.classes)
    chosen = sample(targets, max_examples, seed)
    examples = Subset(inputs, chosen) if chosen is not None else inputs
    if chosen is not None:
        targets = targets[torch.as_tensor(chosen)]
    identity = base.identity()
    hit = False
    if cache_dir is None or identity["origin"] is None or not dataset.sha256:
        features = extract_features(model, examples, target_device, amp, on_batch)
    else:
        key = feature_key(identity, spec.input_spec, dataset.sha256, dataset.schema_info, amp, subset=chosen)
        features, hit = FeatureCache(cache_dir).get_or_compute(
            key, lambda: extract_features(model, examples, target_device, amp, on_batch).cpu()
        )
    features = features.to(target_device).float()
    if not bool(torch.isfinite(features).all()):
        raise NonFiniteOutput(
            f"model {base.id} computes NaN or infinite features on dataset {dataset.id}: its weights, or the "
            "data, hold values it cannot compute with; it cannot be scored",
            param="models",
        )
    has_head = model.head is not None
    probabilities = (
        torch.softmax(model.classify(features).float(), dim=1).cpu().double().numpy() if has_head else None
    )
    feature_array = features.cpu().double().numpy()
    label_array = targets.numpy().astype(np.int64)
    scores: dict[str, float | None] = {}
    for metric in metrics:
        if metric in transferability.HEAD_METRICS and probabilities is None:
            scores[metric] = None
        else:
            scores[metric] = float(transferability.score(metric, feature_array, label_array, probabilities))
    return {
        "model": base.id,
        "architecture": spec.architecture,
        "source_head": has_head,
        "scores": scores,
        "examples": len(label_array),
        "feature_cache_hit": hit,
        "seconds": round(time.perf_counter() - started, 3),
    }


def rank_models(
    candidates: list[BaseModelSource],
    dataset: DatasetSource,
    metrics: list[str],
    *,
    rank_by: str,
    cache_dir: Path | None,
    max_examples: int,
    seed: int = 0,
    on_batch: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """`on_batch` is called after every batch of every forward pass (it may raise to stop)."""
    started = time.perf_counter()
    results = [
        score_model(
            base,
            dataset,
            metrics,
            cache_dir=cache_dir,
            max_examples=max_examples,
            seed=seed,
            on_batch=on_batch,
        )
        for base in candidates
    ]
    for metric in metrics:
        scored = sorted(
            (r for r in results if r["scores"][metric] is not None), key=lambda r: -r["scores"][metric]
        )
        for position, result in enumerate(scored, start=1):
            result.setdefault("ranks", {})[metric] = position
        for result in results:
            result.setdefault("ranks", {}).setdefault(metric, None)
    ranking = [r["model"] for r in sorted(results, key=lambda r: r["ranks"][rank_by] or len(results) + 1)]
    return {
        "object": "transferability",
        "dataset": dataset.id,
        "examples": results[0]["examples"] if results else 0,
        "metrics": metrics,
        "rank_by": rank_by,
        "ranking": ranking,
        "results": results,
        "seconds": round(time.perf_counter() - started, 3),
    }
