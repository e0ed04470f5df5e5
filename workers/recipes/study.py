"""A fine-tuning job as a study: the transferred run, and with `baseline` the same architecture trained
from scratch on the same data with the same budget, repeated for each seed. More arms, when the job names
them, are measured on the same held-out examples: another upstream fine-tuned the same way (the base
model's parent, or any model) and the upstream as it is, with no fine-tuning.

The first seed's transferred run is the job's own: its checkpoints are saved and its best epoch becomes
the result model. The other runs report their metrics as events.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor

from graft.defaults import METHOD_DEFAULTS
from graft.jobspec import Hyperparameters
from graft.report import build_report
from graft.sources import BaseModelSource, DatasetSource
from graft.spec import ModelSpec
from ml.resume import Journal
from ml.runtime import Reporter, load_upstream
from workers.recipes.finetune import FinetuneConfig, FinetuneRecipe, FinetuneResult


class RunReporter:
    """Reports one run of a study: progress across all runs, metrics of secondary runs as events."""

    def __init__(self, inner: Reporter, name: str, index: int, runs: int, primary: bool) -> None:
        self.inner = inner
        self.name = name
        self.index = index
        self.runs = runs
        self.primary = primary
        # Where this run keeps its training state, when the job's reporter keeps one (the worker's does).
        self.journal = inner.journal_for(name, primary)

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
        return self.inner.stop_reason

    def journal_for(self, run: str, primary: bool) -> Journal | None:
        return self.inner.journal_for(run, primary)


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
class Arm:
    """One more arm of a baseline study: `parent` or `model` (that upstream, fine-tuned like the job's) or
    `as_is` (the job's upstream predicting with its own head, no training)."""

    name: str
    kind: Literal["parent", "as_is", "model"]
    base: BaseModelSource | None = None  # None for as_is: the job's own upstream


@dataclass
class ArmRuns:
    arm: Arm
    correct: list[list[int]] = field(default_factory=list)  # per seed, over the compared examples


@torch.no_grad()
def as_is_correct(base: BaseModelSource, source: DatasetSource, classes: list[str]) -> list[int]:
    """Per example of `source`: 1 when the upstream model, with its own head and no training, names its
    class. The head's classes are matched to the dataset's by name. It never trains, so a study computes
    this once and reads every seed's and fold's examples from it."""
    from ml.data import batches, label_indices, load_inputs

    model, spec = load_upstream(base)
    model.eval()
    inputs, labels = load_inputs(source, spec)
    assert labels is not None, "as_is is measured on labelled examples"
    targets = label_indices(labels, classes)
    names = list(spec.classes)
    predicted: list[int] = []
    for indices in batches(len(inputs), 64, shuffle=False):
        for row in model(inputs.batch(indices)).argmax(dim=1).tolist():
            predicted.append(classes.index(names[row]) if names[row] in classes else -1)
    return [int(p == int(t)) for p, t in zip(predicted, targets.tolist(), strict=True)]


def recipe_for(config: FinetuneConfig, reporter: Reporter) -> FinetuneRecipe:
    """The run's recipe: semi-supervised when the config brings unlabelled data (every arm of a study
    then trains with them, so the comparison is of upstreams, not of data)."""
    from workers.recipes.semi_supervised import SemiSupervisedConfig, SemiSupervisedRecipe

    if isinstance(config, SemiSupervisedConfig):
        return SemiSupervisedRecipe(config, reporter)
    return FinetuneRecipe(config, reporter)


def arm_config(config: FinetuneConfig, arm: Arm) -> FinetuneConfig:
    """The job's run with another upstream: same method, hyperparameters and data."""
    assert arm.base is not None
    return config.model_copy(update={"base": arm.base, "save_checkpoints": False, "head": None})


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
    arms: list[Arm] | None = None,
) -> StudyResult:
    """The job's runs. With `folds` (k > 1, and a baseline), the comparison is a k-fold cross-validation
    over all the training data: for each seed and fold, both arms train on k-1 folds and predict the
    held-out one, so every labelled example is predicted by models that never saw it; the job's own model
    then trains on all of them. With an evaluation dataset, both arms are measured on it instead."""
    seeds = seeds or [config.seed]
    extra = [ArmRuns(arm) for arm in (arms or [])] if baseline else []
    trained = [runs for runs in extra if runs.arm.kind != "as_is"]
    per_seed = (2 + len(trained)) if baseline else 1
    cross_validate = baseline and folds > 1 and config.evaluation is None and config.validation is None
    if cross_validate:
        return _cross_validated_study(config, reporter, seeds, folds, extra)
    total = len(seeds) * per_seed
    transferred: list[FinetuneResult] = []
    scratch: list[FinetuneResult] = []
    as_is = _as_is_rows(config, extra, config.evaluation or config.train)
    for i, seed in enumerate(seeds):
        run_config = config.model_copy(
            update={"seed": seed, "save_checkpoints": config.save_checkpoints and i == 0}
        )
        transferred.append(
            recipe_for(
                run_config,
                RunReporter(reporter, f"transferred, seed {seed}", i * per_seed, total, primary=i == 0),
            ).run()
        )
        if not baseline:
            continue
        scratch.append(
            recipe_for(
                scratch_config(run_config),
                RunReporter(reporter, f"scratch, seed {seed}", i * per_seed + 1, total, primary=False),
            ).run()
        )
        for k, runs in enumerate(trained):
            run = recipe_for(
                arm_config(run_config, runs.arm),
                RunReporter(
                    reporter, f"{runs.arm.name}, seed {seed}", i * per_seed + 2 + k, total, primary=False
                ),
            ).run()
            runs.correct.append(_compared(run, config))
        for runs in extra:
            if runs.arm.kind == "as_is" and as_is is not None:
                # Every example of the evaluation dataset, or this seed's validation examples.
                evaluated = config.evaluation is not None
                positions = range(len(as_is)) if evaluated else transferred[-1].validation_positions
                runs.correct.append([as_is[p] for p in positions])
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
        compared = [_compared(r, config) for r in transferred]
        report = _report(config, reporter, seeds, transferred, scratch, held_out, extra, compared)
    return StudyResult(result=transferred[0], report=report)


def _as_is_rows(config: FinetuneConfig, extra: list[ArmRuns], source: DatasetSource) -> list[int] | None:
    """The as_is arm's correctness on every example of `source`, when the study has that arm."""
    if not any(runs.arm.kind == "as_is" for runs in extra):
        return None
    return as_is_correct(config.base, source, list(config.classes or config.train.classes))


def _compared(run: FinetuneResult, config: FinetuneConfig) -> list[int]:
    """Per compared example, whether the run was right: on the evaluation dataset when there is one, else on
    the validation examples (the same for every arm: the split is seeded)."""
    if config.evaluation is not None:
        assert run.held_out is not None
        return list(run.held_out["correct"])
    return list(run.validation_correct)


def _report(
    config: FinetuneConfig,
    reporter: Reporter,
    seeds: list[int],
    transferred: list[FinetuneResult],
    scratch: list[FinetuneResult],
    held_out: tuple[dict[str, Any], list[list[int]], list[list[int]]] | None,
    extra: list[ArmRuns] | None = None,
    transferred_correct: list[list[int]] | None = None,
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
    arms: dict[str, tuple[str, str, list[list[int]]]] | None = None
    if extra:
        assert transferred_correct is not None
        arms = {
            runs.arm.name: (
                runs.arm.kind,
                runs.arm.base.id if runs.arm.base is not None else config.base.id,
                runs.correct,
            )
            for runs in extra
        }
        for runs in extra:
            if runs.arm.base is not None:
                budget[runs.arm.name] = {"base_model": runs.arm.base.id, "method": config.method}
    report = build_report(
        seeds,
        transferred,
        scratch,
        budget,
        held_out=held_out,
        arms=arms,
        transferred_correct=transferred_correct,
    )
    reporter.event(report["summary"], data={"negative_transfer": report["negative_transfer"]})
    return report


def _cross_validated_study(
    config: FinetuneConfig, reporter: Reporter, seeds: list[int], folds: int, extra: list[ArmRuns]
) -> StudyResult:
    from ml.data import label_indices, read_labels, stratified_folds

    labels = label_indices(read_labels(config.train), config.classes or config.train.classes)
    n = len(labels)
    partitions = [stratified_folds(labels, folds, seed) for seed in seeds]
    trained = [runs for runs in extra if runs.arm.kind != "as_is"]
    total = 1 + (2 + len(trained)) * len(seeds) * folds
    as_is = _as_is_rows(config, extra, config.train)
    # The job's own model: every label, no validation split (the estimate comes from the folds).
    everything = config.model_copy(
        update={"hyperparameters": config.hyperparameters.model_copy(update={"validation_split": 0.0})}
    )
    result = recipe_for(
        everything, RunReporter(reporter, "transferred, all labels", 0, total, primary=True)
    ).run()
    transferred_runs: list[FinetuneResult] = []
    scratch_runs: list[FinetuneResult] = []
    transferred_correct: list[list[int]] = []
    scratch_correct: list[list[int]] = []
    index = 1
    for seed, partition in zip(seeds, partitions, strict=True):
        rows = {"transferred": [0] * n, "scratch": [0] * n, **{r.arm.name: [0] * n for r in trained}}
        for k, held in enumerate(partition):
            held_set = set(held)
            split = ([i for i in range(n) if i not in held_set], sorted(held))
            # The held-out fold chooses nothing: the last epoch, as the job's own model on all labels.
            hp = config.hyperparameters.model_copy(update={"model_selection": "last", "early_stopping": None})
            fold = config.model_copy(
                update={"seed": seed, "split": split, "save_checkpoints": False, "hyperparameters": hp}
            )
            arms_of_fold: list[tuple[str, FinetuneConfig, list[FinetuneResult]]] = [
                ("transferred", fold, transferred_runs),
                ("scratch", scratch_config(fold).model_copy(update={"split": split}), scratch_runs),
                *[(r.arm.name, arm_config(fold, r.arm), []) for r in trained],
            ]
            for arm, arm_fold, results in arms_of_fold:
                run = recipe_for(
                    arm_fold,
                    RunReporter(reporter, f"{arm}, seed {seed}, fold {k + 1}", index, total, primary=False),
                ).run()
                index += 1
                results.append(run)
                for position, right in zip(run.validation_positions, run.validation_correct, strict=True):
                    rows[arm][position] = right
        transferred_correct.append(rows["transferred"])
        scratch_correct.append(rows["scratch"])
        for named in extra:
            named.correct.append(
                list(as_is) if named.arm.kind == "as_is" and as_is is not None else rows[named.arm.name]
            )
    measured_on = {"kind": "cross_validation", "folds": folds, "examples": n}
    report = _report(
        config,
        reporter,
        [seed for seed in seeds for _ in range(folds)],
        transferred_runs,
        scratch_runs,
        (measured_on, transferred_correct, scratch_correct),
        extra,
        transferred_correct,
    )
    return StudyResult(result=result, report=report)
