"""The training-loop parts every recipe shares, so that none writes its own and none can drift:

- mixed precision with its loss scaler, and the optimiser step that goes with it (zero the gradients,
  scaled backward, unscale, clip each parameter group on its own, step, update the scale, advance the
  schedule): a loss in fp16 without loss scaling underflows;
- AdamW with the warm-up and cosine schedule (`optimizer_and_schedule`);
- the loop's training state under named keys (`Loop.state`, `Loop.restore`: optimiser, schedule, loss
  scaler, generator beside the model's tensors);
- after every optimiser step, progress and the stop checks (`after_step`);
- the recipe interface (`Recipe`: setup, restore, train) and running one from its journal (`run_recipe`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from graft.errors import TrainingDiverged
from ml.resume import TrainingState, optimizer_state, restore_optimizer, restore_rng, rng_state
from ml.runtime import JobPreempted, Reporter, autocast_dtype, stop_signal


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


def warmup_cosine(total_steps: int, warmup_ratio: float) -> Callable[[int], float]:
    """The learning-rate factor of each step: linear warm-up over `warmup_ratio` of the steps, then cosine
    decay to zero at `total_steps` (a schedule that converges, so the last epoch is a result)."""
    warmup = max(1, int(total_steps * warmup_ratio)) if warmup_ratio > 0 else 0

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def optimizer_and_schedule(
    groups: Any,
    *,
    weight_decay: float,
    total_steps: int,
    warmup_ratio: float,
    learning_rate: float | None = None,
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over `groups` (parameters, or groups carrying their own `lr`) with the warm-up and cosine
    schedule over `total_steps`."""
    options: dict[str, Any] = {"weight_decay": weight_decay}
    if learning_rate is not None:
        options["lr"] = learning_rate
    optimizer = torch.optim.AdamW(groups, **options)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(total_steps, warmup_ratio))


# The named parts of every recipe's training state (ml/resume.py): the trained weights, the optimiser's
# moments, the random generator; in its meta the same names, and the schedule and the loss scaler.
MODEL, OPTIMIZER, RNG, SCHEDULER, SCALER = "model", "optimizer", "rng", "scheduler", "scaler"


@dataclass
class Loop:
    """What every recipe's loop trains with, saved and restored together under the named keys."""

    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    precision: MixedPrecision
    generator: torch.Generator

    def state(self, model_tensors: dict[str, Tensor], **meta: Any) -> TrainingState:
        """A training state holding the model's trained tensors and the loop's own parts; `meta` (epoch,
        batch, step, complete, history, and what the recipe adds) goes beside them."""
        state = TrainingState(
            meta={**meta, SCHEDULER: self.scheduler.state_dict(), SCALER: self.precision.state_dict()}
        )
        state.put(MODEL, model_tensors)
        optimizer_tensors, state.meta[OPTIMIZER] = optimizer_state(self.optimizer)
        state.put(OPTIMIZER, optimizer_tensors)
        rng_tensors, state.meta[RNG] = rng_state(self.generator)
        state.put(RNG, rng_tensors)
        return state

    def restore(self, state: TrainingState) -> None:
        """Put the optimiser, schedule, loss scaler and generator back as `state` saved them (the model's
        tensors are the recipe's to load: `state.group(MODEL)`)."""
        restore_optimizer(self.optimizer, state.group(OPTIMIZER), state.meta[OPTIMIZER])
        self.scheduler.load_state_dict(state.meta[SCHEDULER])
        self.precision.load_state_dict(state.meta.get(SCALER))  # absent from states saved before it
        restore_rng(self.generator, state.group(RNG), state.meta[RNG])


def finite_loss(loss: Tensor, reporter: Reporter, *, epoch: int, step: int, phase: str = "") -> float:
    """A batch's loss as a number, checked before the step that would apply it: NaN or infinity means the
    run diverged (too high a learning rate, values far out of range), and nothing it learns after that
    means anything, so it stops with TrainingDiverged naming where, instead of finishing with NaN weights."""
    value = float(loss.detach())
    if not math.isfinite(value):
        run = getattr(reporter, "name", None)
        raise TrainingDiverged(
            f"the training loss became {value} at {phase}epoch {epoch}, step {step}"
            + (f" of run '{run}'" if run else "")
            + ": the run diverged and stopped. Lower the learning_rate, or look for extreme values in the "
            "training data"
        )
    return value


def after_step(
    reporter: Reporter,
    *,
    epoch: int,
    epochs: int,
    step: int,
    total_steps: int,
    check: bool = True,
    on_preempt: Callable[[], None] | None = None,
) -> None:
    """What follows every optimiser step of every recipe: report the progress and, when `check`, stop if
    the run must (cancelled, lease lost, or the worker releasing it: then `on_preempt` first saves what the
    next attempt resumes from)."""
    reporter.progress(epoch=epoch, epochs=epochs, step=step, total_steps=total_steps)
    if not check:
        return
    signal = stop_signal(reporter)
    if signal is None:
        return
    if isinstance(signal, JobPreempted) and on_preempt is not None:
        on_preempt()
    raise signal


class Recipe(Protocol):
    """The interface every runnable recipe has: `setup` (model, data, optimiser), `restore` (continue from
    a saved training state, after setup), `train` (to the end; it saves its state to the journal as it
    goes) and the reporter it reports through, whose journal holds the run's state."""

    reporter: Reporter

    def setup(self) -> None: ...

    def restore(self, state: TrainingState) -> None: ...

    def train(self) -> Any: ...


def run_recipe(recipe: Recipe) -> Any:
    """Run a recipe from the start or from the state its journal holds: setup (its messages dropped on a
    resume, which the attempt that first ran it wrote), restore, train; the result is `train`'s."""
    journal = recipe.reporter.journal
    saved = journal.load() if journal is not None else None
    if saved is None:
        recipe.setup()
    else:
        reporter, recipe.reporter = recipe.reporter, SilentEvents(recipe.reporter)  # type: ignore[assignment]
        try:
            recipe.setup()
        finally:
            recipe.reporter = reporter
        recipe.restore(saved)
    return recipe.train()


class SilentEvents:
    """A reporter that drops messages and passes everything else on."""

    def __init__(self, inner: Reporter) -> None:
        self.inner = inner

    def event(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)
