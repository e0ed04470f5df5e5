"""Batch-norm statistics under a domain shift: how far a dataset's activations are from the statistics
stored in the weights, and their re-estimation on that dataset (AdaBN, Li et al., 2016)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from ml.data import Inputs, batches
from ml.features import FEATURE_BATCH_SIZE

# Above this shift score the stored statistics are replaced by the data's. Measured: printed digits'
# statistics on handwritten ones (the same white-on-black strokes) 0.017; on the same digits inverted,
# 0.08; ImageNet's (EfficientNet-Lite0) on 32 px digits, 5.1.
BN_SHIFT_THRESHOLD = 0.05
# Statistics are estimated from at most this many training examples.
MAX_EXAMPLES = 4096


def _sample(inputs: Inputs) -> list[list[int]]:
    n = min(len(inputs), MAX_EXAMPLES)
    step = max(1, len(inputs) // n)
    chosen = list(range(0, len(inputs), step))[:n]
    return [chosen[i : i + FEATURE_BATCH_SIZE] for i in range(0, len(chosen), FEATURE_BATCH_SIZE)]


def _to(batch: object, device: torch.device) -> object:
    if isinstance(batch, dict):
        return {key: value.to(device) for key, value in batch.items()}
    assert isinstance(batch, Tensor)
    return batch.to(device)


@torch.no_grad()
def norm_shift(
    model: nn.Module,
    norms: Sequence[nn.modules.batchnorm._BatchNorm],
    inputs: Inputs,
    device: torch.device,
    on_batch: Callable[[], None] = lambda: None,
) -> float:
    """Mean over batch norms and channels of the symmetric KL divergence between the Gaussian of the
    stored statistics and that of the layer's inputs on `inputs` (the network in eval mode, so each layer
    sees what the stored statistics make of the layers below)."""
    sums: dict[int, list[Tensor]] = {}

    def hook(module: nn.Module, args: tuple[Tensor, ...]) -> None:
        x = args[0].float()
        dims = [0, *range(2, x.dim())]
        total = sums.setdefault(
            id(module), [torch.zeros(x.shape[1], device=x.device)] * 2 + [torch.zeros(())]
        )
        total[0] = total[0] + x.sum(dim=dims)
        total[1] = total[1] + (x * x).sum(dim=dims)
        total[2] = total[2] + x.numel() / x.shape[1]

    handles = [norm.register_forward_pre_hook(hook) for norm in norms]
    was_training = model.training
    model.eval()
    try:
        for indices in _sample(inputs):
            model.backbone(_to(inputs.batch(indices), device))  # type: ignore[operator]
            on_batch()
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    scores = []
    for norm in norms:
        total = sums.get(id(norm))
        if total is None or norm.running_mean is None or norm.running_var is None:
            continue
        count = float(total[2])
        mean = total[0] / count
        var = (total[1] / count - mean * mean).clamp_min(0.0) + norm.eps
        stored_mean, stored_var = norm.running_mean.float(), norm.running_var.float() + norm.eps
        scores.append(_symmetric_kl(stored_mean, stored_var, mean, var).mean())
    return float(torch.stack(scores).mean()) if scores else 0.0


def _symmetric_kl(mean_a: Tensor, var_a: Tensor, mean_b: Tensor, var_b: Tensor) -> Tensor:
    """Half the symmetric KL divergence between N(mean_a, var_a) and N(mean_b, var_b), per channel."""
    difference = (mean_a - mean_b) ** 2
    return 0.25 * ((var_b + difference) / var_a + (var_a + difference) / var_b - 2.0)


def gaussian_shift(stored_mean: Tensor, stored_std: Tensor, mean: Tensor, std: Tensor) -> float:
    """The shift score of columns standardised with stored statistics: the median over columns of the
    symmetric KL divergence, a constant column's spread taken as 1 (as the standardisation takes it).
    The median, not the mean: a nearly constant column (a digit's corner pixel) differs between two
    samples of one distribution by chance, and a real shift moves most columns."""
    floor = torch.ones_like(std)
    stored = torch.where(stored_std > 1e-6, stored_std, floor).float() ** 2
    current = torch.where(std > 1e-6, std, floor).float() ** 2
    return float(_symmetric_kl(stored_mean.float(), stored, mean.float(), current).median())


@torch.no_grad()
def reestimate_norms(
    model: nn.Module,
    norms: Sequence[nn.modules.batchnorm._BatchNorm],
    inputs: Inputs,
    device: torch.device,
    on_batch: Callable[[], None] = lambda: None,
) -> None:
    """Replace each batch norm's running statistics by the cumulative average over `inputs` (every other
    module in eval mode, no gradients, no weight changes)."""
    was_training = model.training
    model.eval()
    momenta = [norm.momentum for norm in norms]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # a cumulative average over the batches, not an exponential one
        norm.train()
    try:
        for indices in batches(len(inputs), FEATURE_BATCH_SIZE, shuffle=False):
            if len(indices) < 2:
                continue  # a batch of one has no variance to estimate
            model.backbone(_to(inputs.batch(indices), device))  # type: ignore[operator]
            on_batch()
    finally:
        for norm, momentum in zip(norms, momenta, strict=True):
            norm.momentum = momentum
        model.train(was_training)
