"""The training-loop parts every recipe shares: mixed precision with its loss scaler, and the optimiser step
that goes with it (zero the gradients, scaled backward, unscale, clip each parameter group on its own,
step, update the scale, advance the schedule). A recipe that trains calls `MixedPrecision.step`; none
writes its own backward pass, so none can drift (a loss in fp16 without loss scaling underflows)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ml.runtime import autocast_dtype


class MixedPrecision:
    """bf16 autocast on CUDA cards that have it, fp16 with a GradScaler on those that do not, full
    precision on the CPU."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.dtype = autocast_dtype(device)
        # fp16 needs loss scaling; bf16 and fp32 do not.
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.dtype == torch.float16)

    def autocast(self) -> Any:
        if self.dtype is None:
            return torch.autocast(device_type="cpu", enabled=False)
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def step(
        self,
        loss: Tensor,
        optimizer: torch.optim.Optimizer,
        clip: Sequence[Sequence[nn.Parameter]],
        max_norm: float,
        scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    ) -> None:
        """One optimiser step on `loss`; each list of parameters in `clip` has its gradient norm clipped to
        `max_norm` on its own (a domain discriminator's gradients never crowd out the model's)."""
        optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(optimizer)
        for parameters in clip:
            if parameters:
                nn.utils.clip_grad_norm_(parameters, max_norm)
        self.scaler.step(optimizer)
        self.scaler.update()
        if scheduler is not None:
            scheduler.step()

    def state_dict(self) -> dict[str, Any]:
        """The loss scaler's state for a training state (empty without loss scaling)."""
        return self.scaler.state_dict()

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        if state and self.scaler.is_enabled():  # empty when saved without loss scaling
            self.scaler.load_state_dict(state)
