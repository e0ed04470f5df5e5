"""ml.training: the loop parts every recipe shares. The one optimiser step: with loss scaling on (fp16
cards) it equals an unscaled one (gradients unscaled before clipping), and the scale travels in the
training state. The loop's state under its named keys resumes a run exactly; the schedule converges; a
recipe runs from its journal."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from ml.resume import TrainingState
from ml.runtime import JobCancelled, JobPreempted
from ml.training import (
    MODEL,
    OPTIMIZER,
    RNG,
    SCALER,
    SCHEDULER,
    Loop,
    MixedPrecision,
    after_step,
    optimizer_and_schedule,
    run_recipe,
    warmup_cosine,
)
from tests.unit.test_finetune_recipe import ListReporter


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


def _loop(seed: int) -> tuple[nn.Linear, Loop]:
    model, _, _ = _model_and_loss(seed)
    optimizer, schedule = optimizer_and_schedule(
        model.parameters(), learning_rate=0.1, weight_decay=0.01, total_steps=20, warmup_ratio=0.2
    )
    generator = torch.Generator().manual_seed(seed)
    return model, Loop(optimizer, schedule, MixedPrecision(torch.device("cpu")), generator)


def _train(model: nn.Linear, loop: Loop, steps: int) -> None:
    for _ in range(steps):
        x = torch.randn(8, 4, generator=loop.generator)
        y = torch.randint(0, 3, (8,), generator=loop.generator)
        loss = nn.functional.cross_entropy(model(x), y)
        loop.precision.step(loss, loop.optimizer, [list(model.parameters())], 1.0, loop.scheduler)


def test_the_loop_state_resumes_a_run_exactly() -> None:
    """Saved under its named keys and restored into a fresh model and loop, a run goes on exactly as the
    uninterrupted one: the optimiser's moments, the schedule's position and the generator come back."""
    uninterrupted, reference_loop = _loop(0)
    _train(uninterrupted, reference_loop, 20)
    model, loop = _loop(0)
    _train(model, loop, 10)

    state = loop.state(model.state_dict(), epoch=1, step=10, history=[])
    assert {MODEL, OPTIMIZER, RNG} <= {name.split("/")[0] for name in state.tensors}
    assert state.meta["step"] == 10 and SCHEDULER in state.meta and SCALER in state.meta
    resumed, fresh = _loop(5)  # other weights, another seed: everything must come from the state
    resumed.load_state_dict(state.group(MODEL))
    fresh.restore(state)
    _train(resumed, fresh, 10)
    for name, tensor in uninterrupted.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], tensor), name
    assert fresh.scheduler.get_last_lr() == reference_loop.scheduler.get_last_lr()


def test_the_schedule_warms_up_then_decays_to_zero() -> None:
    factor = warmup_cosine(100, 0.1)
    assert [factor(s) for s in (0, 4, 9)] == [0.1, 0.5, 1.0]
    assert factor(10) == 1.0 and 0 < factor(55) < 1 and factor(100) == 0.0


class _Recipe:
    def __init__(self, journal: object) -> None:
        self.reporter = ListReporter()
        self.reporter.journal = journal  # type: ignore[assignment]
        self.restored: list[int] = []

    def setup(self) -> None:
        self.reporter.event("Training 10 parameters")

    def restore(self, state: TrainingState) -> None:
        self.restored.append(state.step)

    def train(self) -> str:
        return "result"


class _Journal:
    def __init__(self, state: TrainingState | None) -> None:
        self.state = state

    def load(self) -> TrainingState | None:
        return self.state


def test_a_recipe_runs_from_its_journal() -> None:
    """From the start: setup speaks, nothing is restored. From a saved state: setup is silent (the first
    attempt wrote its messages) and the state is restored before training goes on."""
    fresh = _Recipe(_Journal(None))
    assert run_recipe(fresh) == "result"
    assert fresh.restored == [] and fresh.reporter.events == ["Training 10 parameters"]

    resumed = _Recipe(_Journal(TrainingState(meta={"epoch": 2, "step": 7})))
    assert run_recipe(resumed) == "result"
    assert resumed.restored == [7] and resumed.reporter.events == []


class _Stopping(ListReporter):
    def __init__(self, reason: str | None) -> None:
        super().__init__()
        self.stop_reason = reason

    def should_stop(self) -> bool:
        return self.stop_reason is not None


def test_after_each_step_progress_then_the_stop_checks() -> None:
    saved: list[str] = []
    steps = {"epoch": 1, "epochs": 3, "step": 4, "total_steps": 12}
    after_step(_Stopping(None), **steps, on_preempt=lambda: saved.append("state"))  # nothing to stop for
    releasing = _Stopping("release")
    after_step(releasing, **steps, check=False)  # the last batch: the epoch's end saves instead
    assert releasing.progress_seen == [4] and saved == []
    with pytest.raises(JobPreempted):
        after_step(releasing, **steps, on_preempt=lambda: saved.append("state"))
    assert saved == ["state"]  # a released run saves what the next attempt resumes from
    with pytest.raises(JobCancelled):
        after_step(_Stopping("cancel"), **steps, on_preempt=lambda: saved.append("again"))
    assert saved == ["state"]  # a cancelled one saves nothing
