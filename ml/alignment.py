"""Unsupervised domain adaptation: losses that pull target features towards the source's, and label-free
diagnostics of how far apart the domains are.

- DANN (Ganin & Lempitsky 2015): a domain discriminator on the features, trained through a gradient
  reversal layer whose weight follows 2 / (1 + exp(-10 p)) - 1 over training progress p.
- Deep CORAL (Sun & Saenko 2016): the distance between source and target feature covariances.
- Multi-kernel MMD (Long et al. 2015): Gaussian kernels at several bandwidths around the median distance.
- MCC (Jin et al. 2020): minimum class confusion of the target predictions.
- Pseudo-labels: confident target predictions trained as labels (self-training).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

METHODS = ("source_only", "dann", "coral", "mmd", "mcc", "pseudo_label")


class _ReverseGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: float) -> Tensor:
        ctx.weight = weight
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return -ctx.weight * grad, None


def reverse_gradient(x: Tensor, weight: float) -> Tensor:
    return _ReverseGradient.apply(x, weight)  # type: ignore[no-any-return]


def dann_weight(progress: float) -> float:
    return 2.0 / (1.0 + math.exp(-10.0 * progress)) - 1.0


class DomainDiscriminator(nn.Module):
    def __init__(self, feature_dim: int, hidden: int = 256) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(feature_dim, hidden),
            nn.ReLU(),
            nn.Dropout(0.1),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, 1),
        )

    def forward(self, features: Tensor) -> Tensor:
        return self.layers(features).squeeze(-1)


def dann_loss(discriminator: DomainDiscriminator, source: Tensor, target: Tensor, progress: float) -> Tensor:
    features = reverse_gradient(torch.cat([source, target]), dann_weight(progress))
    domains = torch.cat([torch.ones(len(source)), torch.zeros(len(target))]).to(features.device)
    return F.binary_cross_entropy_with_logits(discriminator(features), domains)


def coral_loss(source: Tensor, target: Tensor) -> Tensor:
    d = source.shape[1]

    def covariance(x: Tensor) -> Tensor:
        centred = x - x.mean(dim=0, keepdim=True)
        return centred.T @ centred / max(len(x) - 1, 1)

    return ((covariance(source) - covariance(target)) ** 2).sum() / (4 * d * d)


def mmd(source: Tensor, target: Tensor, scales: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0, 4.0)) -> Tensor:
    """Multi-kernel (Gaussian) maximum mean discrepancy, bandwidths relative to the median distance."""
    joint = torch.cat([source, target])
    distances = torch.cdist(joint, joint).pow(2)
    bandwidth = distances.detach().median().clamp(min=1e-6)
    kernel = sum(torch.exp(-distances / (bandwidth * scale)) for scale in scales) / len(scales)
    n = len(source)
    return kernel[:n, :n].mean() + kernel[n:, n:].mean() - 2 * kernel[:n, n:].mean()  # type: ignore[index]


def mcc_loss(target_logits: Tensor, temperature: float = 2.5) -> Tensor:
    """Minimum class confusion: off-diagonal mass of the entropy-weighted class correlation matrix."""
    probabilities = F.softmax(target_logits / temperature, dim=1)
    entropy = -(probabilities * probabilities.clamp(min=1e-8).log()).sum(dim=1)
    weights = 1 + torch.exp(-entropy)
    weights = (len(target_logits) * weights / weights.sum()).unsqueeze(1)
    confusion = (probabilities * weights).T @ probabilities
    confusion = confusion / confusion.sum(dim=1, keepdim=True)
    classes = target_logits.shape[1]
    return (confusion.sum() - confusion.trace()) / classes


def pseudo_label_loss(target_logits: Tensor, threshold: float) -> Tensor:
    probabilities = F.softmax(target_logits.detach().float(), dim=1)
    confidence, labels = probabilities.max(dim=1)
    mask = confidence >= threshold
    if not bool(mask.any()):
        return target_logits.sum() * 0.0
    return F.cross_entropy(target_logits[mask], labels[mask])


# ---------------------------------------------------------------- diagnostics (no labels needed)


def prediction_entropy(logits: Tensor) -> float:
    probabilities = F.softmax(logits.float(), dim=1)
    return float(-(probabilities * probabilities.clamp(min=1e-12).log()).sum(dim=1).mean())


def class_balance(logits: Tensor, classes: list[str]) -> dict[str, float]:
    counts = torch.bincount(logits.argmax(dim=1).cpu(), minlength=len(classes)).float()
    shares = counts / counts.sum().clamp(min=1)
    return {name: float(share) for name, share in zip(classes, shares, strict=True)}


def a_distance(source: Tensor, target: Tensor, seed: int = 0, steps: int = 300) -> float:
    """Proxy A-distance 2 (1 - 2 err) of a linear domain classifier trained on half of each domain's
    features and tested on the other half (0: indistinguishable domains, 2: perfectly separable)."""
    generator = torch.Generator().manual_seed(seed)
    n = min(len(source), len(target))
    source = source[torch.randperm(len(source), generator=generator)[:n]].float().cpu()
    target = target[torch.randperm(len(target), generator=generator)[:n]].float().cpu()
    if n < 4:
        return float("nan")
    half = n // 2
    features = torch.cat([source, target])
    mean, std = features.mean(dim=0), features.std(dim=0).clamp(min=1e-6)
    train_x = (torch.cat([source[:half], target[:half]]) - mean) / std
    test_x = (torch.cat([source[half:], target[half:]]) - mean) / std
    train_y = torch.cat([torch.ones(half), torch.zeros(half)])
    test_y = torch.cat([torch.ones(n - half), torch.zeros(n - half)])
    classifier = nn.Linear(features.shape[1], 1)
    optimizer = torch.optim.Adam(classifier.parameters(), lr=0.01, weight_decay=1e-3)
    with torch.enable_grad():
        for _ in range(steps):
            optimizer.zero_grad()
            F.binary_cross_entropy_with_logits(classifier(train_x).squeeze(-1), train_y).backward()
            optimizer.step()
    with torch.no_grad():
        error = float(((classifier(test_x).squeeze(-1) > 0).float() != test_y).float().mean())
    return 2.0 * (1.0 - 2.0 * min(error, 0.5))
