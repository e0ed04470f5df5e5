"""ml.training: the one optimiser step every recipe takes. With loss scaling on (fp16 cards), the step must
equal an unscaled one (gradients unscaled before clipping), and the scale travels in the training state."""

from __future__ import annotations

import copy

import torch
from torch import nn

from ml.training import MixedPrecision


def _model_and_loss(seed: int = 0) -> tuple[nn.Linear, torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    return nn.Linear(4, 3), torch.randn(16, 4), torch.randint(0, 3, (16,))


def _plain_step(model: nn.Linear, x: torch.Tensor, y: torch.Tensor, max_norm: float) -> None:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    optimizer.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    nn.utils.clip_grad_norm_(list(model.parameters()), max_norm)
    optimizer.step()


def test_a_loss_scaled_step_equals_an_unscaled_one_and_its_scale_is_saved() -> None:
    model, x, y = _model_and_loss()
    reference = copy.deepcopy(model)
    _plain_step(reference, x, y, max_norm=0.1)  # the clip binds: unscaling first matters

    precision = MixedPrecision(torch.device("cpu"))
    assert precision.dtype is None and not precision.scaler.is_enabled()  # the CPU: full precision
    precision.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, enabled=True)  # as on an fp16 card
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
    precision.step(
        nn.functional.cross_entropy(model(x), y), optimizer, [list(model.parameters())], 0.1, schedule
    )

    for ours, theirs in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(ours, theirs)
    assert schedule.last_epoch == 1  # the schedule advanced with the step
    saved = precision.state_dict()
    assert saved["scale"] == 2.0**10
    restored = MixedPrecision(torch.device("cpu"))
    restored.scaler = torch.amp.GradScaler("cpu", enabled=True)
    restored.load_state_dict(saved)
    assert restored.scaler.get_scale() == 2.0**10


def test_each_parameter_group_is_clipped_on_its_own() -> None:
    torch.manual_seed(1)
    small, large = nn.Linear(2, 1), nn.Linear(2, 1)
    optimizer = torch.optim.SGD([*small.parameters(), *large.parameters()], lr=1.0)
    before = [p.detach().clone() for p in large.parameters()]
    x = torch.randn(8, 2)
    loss = small(x).sum() * 1e-3 + large(x).sum() * 1e3  # the large group's gradient dwarfs the small one's
    precision = MixedPrecision(torch.device("cpu"))
    small_before = [p.detach().clone() for p in small.parameters()]
    precision.step(loss, optimizer, [list(small.parameters()), list(large.parameters())], 1.0)
    moved = torch.cat([(p - b).flatten() for p, b in zip(large.parameters(), before, strict=True)])
    assert moved.norm() <= 1.0 + 1e-5  # clipped to norm 1
    small_moved = torch.cat(
        [(p - b).flatten() for p, b in zip(small.parameters(), small_before, strict=True)]
    )
    # Its own gradient, unclipped (norm at least 1e-3 * 8 from the bias): joint clipping would have scaled
    # it by about 1 / 8,000 with the large group's norm.
    expected = torch.cat([1e-3 * x.sum(0), torch.tensor([1e-3 * 8])])
    torch.testing.assert_close(small_moved, -expected)
