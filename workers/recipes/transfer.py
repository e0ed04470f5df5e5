"""A fine-tuning job as a study: the transferred run, and with `baseline` the same architecture trained
from scratch on the same data with the same budget, repeated for each seed.

The first seed's transferred run is the job's own: its checkpoints are saved and its best epoch becomes
the result model. The other runs report their metrics as events.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor

from workers.backbones.spec import ModelSpec
from workers.recipes.base import BaseModelSource, Reporter
from workers.recipes.defaults import METHOD_DEFAULTS
from workers.recipes.finetune import FinetuneConfig, FinetuneRecipe, FinetuneResult, Hyperparameters
from workers.recipes.report import build_report


class RunReporter:
    """Reports one run of a study: progress across all runs, metrics of secondary runs as events."""

    def __init__(self, inner: Reporter, name: str, index: int, runs: int, primary: bool) -> None:
        self.inner = inner
        self.name = name
        self.index = index
        self.runs = runs
        self.primary = primary
        # Where this run keeps its training state, when the job's reporter keeps one (the worker's does).
        journal_for = getattr(inner, "journal_for", None)
        self.journal = journal_for(name, primary) if journal_for is not None else None

    def event(
        self, message: str, *, level: str = "info", data: dict[str, Any] | None = None, type: str = "message"
    ) -> None:
        prefix = f"[{self.name}] " if self.runs > 1 else ""
        self.inner.event(prefix + message, level=level, data={**(data or {}), "run": self.name}, type=type)

    def progress(self, *, epoch: int, epochs: int, step: int, total_steps: int) -> None:
        self.inner.progress(
            epoch=epoch,
            epochs=epochs,
            step=self.index * total_steps + step,
            total_steps=self.runs * total_steps,
        )

    def metrics(self, *, epoch: int, step: int, values: dict[str, float]) -> None:
        if self.primary:
            self.inner.metrics(epoch=epoch, step=step, values=values)
            return
        shown = ", ".join(f"{k} {v:.4f}" for k, v in values.items() if k not in ("epoch", "epoch_seconds"))
        self.event(f"Epoch {epoch}: {shown}", data={"epoch": epoch, "step": step, **values}, type="metrics")

    def checkpoint(
        self,
        *,
        epoch: int,
        step: int,
        tensors: dict[str, Tensor],
        spec: ModelSpec,
        metrics: dict[str, float],
        metadata: dict[str, str],
        best: bool,
    ) -> None:
        if self.primary:
            self.inner.checkpoint(
                epoch=epoch,
                step=step,
                tensors=tensors,
                spec=spec,
                metrics=metrics,
                metadata=metadata,
                best=best,
            )

    def should_stop(self) -> bool:
        return self.inner.should_stop()

    @property
    def stop_reason(self) -> str | None:
        return getattr(self.inner, "stop_reason", None)


def scratch_config(config: FinetuneConfig) -> FinetuneConfig:
    """The same architecture with random weights, trained in full for the same epochs on the same data,
    with the same augmentation and model selection, at the architecture's from-scratch learning rate (a
    fine-tuning rate, lower, would handicap it)."""
    architecture = config.base.spec.architecture
    hp = config.hyperparameters
    learning_rate = METHOD_DEFAULTS[(architecture, "full")]["learning_rate"]
    scratch_hp = Hyperparameters(
        **{
            **hp.model_dump(
                include={
                    "epochs",
                    "batch_size",
                    "weight_decay",
                    "validation_split",
                    "warmup_ratio",
                    "max_grad_norm",
                    "early_stopping",
                    "augmentation",
                    "model_selection",
                }
            ),
            "learning_rate": learning_rate,
            "layer_lr_decay": 1.0,
            "freeze_batch_norm": False,  # random weights have no statistics worth keeping
        }
    )
    base = BaseModelSource(
        id=f"{architecture} (random weights)", spec=ModelSpec.for_builtin(architecture), pretrained=False
    )
    return config.model_copy(
        update={
            "base": base,
            "method": "full",
            "hyperparameters": scratch_hp,
            "head": None,
            "save_checkpoints": False,
            "feature_cache_dir": None,
        }
    )


@dataclass
class StudyResult:
    result: FinetuneResult  # the job's own run: first seed, transferred
    report: dict[str, Any] | None


def run_study(
    config: FinetuneConfig,
    reporter: Reporter,
    *,
    seeds: list[int] | None = None,
    baseline: bool = False,
    folds: int = 0,
) -> StudyResult:
    """The job's runs. With `folds` (k > 1, and a baseline), the comparison is a k-fold cross-validation
    over all the training data: for each seed and fold, both arms train on k-1 folds and predict the
    held-out one, so every labelled example is predicted by models that never saw it; the job's own model
    then trains on all of them. With an evaluation dataset, both arms are measured on it instead."""
    seeds = seeds or [config.seed]
    arms = 2 if baseline else 1
    cross_validate = baseline and folds > 1 and config.evaluation is None and config.validation is None
    if cross_validate:
        return _cross_validated_study(config, reporter, seeds, folds)
    total = len(seeds) * arms
    transferred: list[FinetuneResult] = []
    scratch: list[FinetuneResult] = []
    for i, seed in enumerate(seeds):
        run_config = config.model_copy(
            update={"seed": seed, "save_checkpoints": config.save_checkpoints and i == 0}
        )
        transferred.append(
            FinetuneRecipe(
                run_config,
                RunReporter(reporter, f"transferred, seed {seed}", i * arms, total, primary=i == 0),
            ).run()
        )
        if baseline:
            scratch.append(
                FinetuneRecipe(
                    scratch_config(run_config),
                    RunReporter(reporter, f"scratch, seed {seed}", i * arms + 1, total, primary=False),
                ).run()
            )
    report = None
    if baseline:
        held_out = None
        if config.evaluation is not None:
            first = transferred[0].held_out
            assert first is not None
            held_out = (
                {"kind": "evaluation_dataset", "dataset": first["dataset"], "examples": first["examples"]},
                [r.held_out["correct"] for r in transferred if r.held_out is not None],
                [r.held_out["correct"] for r in scratch if r.held_out is not None],
            )
        report = _report(config, reporter, seeds, transferred, scratch, held_out)
    return StudyResult(result=transferred[0], report=report)


def _report(
    config: FinetuneConfig,
    reporter: Reporter,
    seeds: list[int],
    transferred: list[FinetuneResult],
    scratch: list[FinetuneResult],
    held_out: tuple[dict[str, Any], list[list[int]], list[list[int]]] | None,
) -> dict[str, Any]:
    scratch_hp = scratch_config(config).hyperparameters
    budget = {
        "epochs": config.hyperparameters.epochs,
        "batch_size": config.hyperparameters.batch_size,
        "transferred": {
            "base_model": config.base.id,
            "method": config.method,
            "learning_rate": config.hyperparameters.learning_rate,
        },
        "scratch": {
            "architecture": config.base.spec.architecture,
            "method": "full",
            "learning_rate": scratch_hp.learning_rate,
        },
    }
    report = build_report(seeds, transferred, scratch, budget, held_out=held_out)
    reporter.event(report["summary"], data={"negative_transfer": report["negative_transfer"]})
    return report


def _cross_validated_study(
    config: FinetuneConfig, reporter: Reporter, seeds: list[int], folds: int
) -> StudyResult:
    from workers.recipes.data import label_indices, read_labels, stratified_folds

    labels = label_indices(read_labels(config.train), config.classes or config.train.classes)
    n = len(labels)
    partitions = [stratified_folds(labels, folds, seed) for seed in seeds]
    total = 1 + 2 * len(seeds) * folds
    # The job's own model: every label, no validation split (the estimate comes from the folds).
    everything = config.model_copy(
        update={"hyperparameters": config.hyperparameters.model_copy(update={"validation_split": 0.0})}
    )
    result = FinetuneRecipe(
        everything, RunReporter(reporter, "transferred, all labels", 0, total, primary=True)
    ).run()
    transferred_runs: list[FinetuneResult] = []
    scratch_runs: list[FinetuneResult] = []
    transferred_correct: list[list[int]] = []
    scratch_correct: list[list[int]] = []
    index = 1
    for seed, partition in zip(seeds, partitions, strict=True):
        rows = {"transferred": [0] * n, "scratch": [0] * n}
        for k, held in enumerate(partition):
            held_set = set(held)
            split = ([i for i in range(n) if i not in held_set], sorted(held))
            # The held-out fold chooses nothing: the last epoch, as the job's own model on all labels.
            hp = config.hyperparameters.model_copy(update={"model_selection": "last", "early_stopping": None})
            fold = config.model_copy(
                update={"seed": seed, "split": split, "save_checkpoints": False, "hyperparameters": hp}
            )
            for arm, arm_config, runs in (
                ("transferred", fold, transferred_runs),
                ("scratch", scratch_config(fold).model_copy(update={"split": split}), scratch_runs),
            ):
                run = FinetuneRecipe(
                    arm_config,
                    RunReporter(reporter, f"{arm}, seed {seed}, fold {k + 1}", index, total, primary=False),
                ).run()
                index += 1
                runs.append(run)
                for position, right in zip(run.validation_positions, run.validation_correct, strict=True):
                    rows[arm][position] = right
        transferred_correct.append(rows["transferred"])
        scratch_correct.append(rows["scratch"])
    measured_on = {"kind": "cross_validation", "folds": folds, "examples": n}
    report = _report(
        config,
        reporter,
        [seed for seed in seeds for _ in range(folds)],
        transferred_runs,
        scratch_runs,
        (measured_on, transferred_correct, scratch_correct),
    )
    return StudyResult(result=result, report=report)
