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

from graft.jobspec import FinetuneHyperparameters, TrainingSpec
from graft.plan import DataFacts, JobPlan, PlannedRun, plan_training
from graft.plan import Upstream as PlanUpstream
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
    """The same architecture with random weights, trained in full on the same data (its hyperparameters
    are the plan's scratch arm's: graft.defaults.scratch_hyperparameters)."""
    architecture = config.base.spec.architecture
    base = BaseModelSource(
        id=f"{architecture} (random weights)", spec=ModelSpec.for_builtin(architecture), pretrained=False
    )
    return config.model_copy(
        update={
            "base": base,
            "method": "full",
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


def run_config(config: FinetuneConfig, run: PlannedRun, arms: dict[str, Arm]) -> FinetuneConfig:
    """The config of one planned run: its arm's upstream and method, its seed, its hyperparameters as the
    plan resolved them; checkpoints only from the job's own run."""
    if run.kind == "scratch":
        config = scratch_config(config)
    elif run.kind in ("parent", "model"):
        config = arm_config(config, arms[run.arm])
    hyperparameters = type(config.hyperparameters).model_validate(run.hyperparameters)
    return config.model_copy(
        update={
            "seed": run.seed,
            "hyperparameters": hyperparameters,
            "save_checkpoints": config.save_checkpoints and run.primary,
        }
    )


@dataclass
class StudyResult:
    result: FinetuneResult  # the job's own run: first seed, transferred
    report: dict[str, Any] | None


def plan_study(
    config: FinetuneConfig,
    *,
    seeds: list[int] | None = None,
    baseline: bool = False,
    folds: int = 0,
    arms: list[Arm] | None = None,
) -> JobPlan:
    """The plan of a study run from a recipe config (benchmarks, tests), made by the planner the API uses
    (graft.plan.plan_training), unpriced."""
    hp = {**config.hyperparameters.model_dump(mode="json"), "cross_validation_folds": folds}
    spec = TrainingSpec(
        kind="finetune",
        base_model=config.base.id,
        method=config.method,
        training_dataset=config.train.id,
        baseline=baseline,
        baseline_arms=["scratch", *[arm.name for arm in arms or []]] if baseline else None,
        seeds=seeds,
        hyperparameters=FinetuneHyperparameters.model_validate(hp),
    )
    architecture = config.base.spec.architecture
    upstream = PlanUpstream(id=config.base.id, learned=config.base.learned, architecture=architecture)
    unknown = DataFacts(examples=0)
    return plan_training(
        spec,
        config.seed,
        upstream=upstream,
        train=unknown,
        validation=unknown if config.validation is not None else None,
        evaluation=unknown if config.evaluation is not None else None,
        named={
            arm.name: PlanUpstream(id=arm.name, learned=True, architecture=architecture)
            for arm in arms or []
            if arm.kind != "as_is"
        },
    )


def run_study(
    config: FinetuneConfig,
    reporter: Reporter,
    plan: JobPlan | None = None,
    *,
    seeds: list[int] | None = None,
    baseline: bool = False,
    folds: int = 0,
    arms: list[Arm] | None = None,
) -> StudyResult:
    """The job's runs, as its plan has them (graft/plan.py): the transferred run and, with a baseline, the
    scratch run and the named arms, for each seed. With cross-validation folds in the plan, the comparison
    is a k-fold cross-validation over all the training data: for each seed and fold, every arm trains on
    k-1 folds and predicts the held-out one, so every labelled example is predicted by models that never
    saw it; the job's own model trains on all of them. With an evaluation dataset, the arms are measured on
    it instead. `arms`: the upstreams of the named arms that train (parent, models), and as_is. Without a
    plan, the study of these `seeds`, `baseline`, `folds` and `arms` is planned here."""
    plan = plan or plan_study(config, seeds=seeds, baseline=baseline, folds=folds, arms=arms)
    named = {arm.name: arm for arm in arms or []}
    runs = plan.runs()
    if any(run.fold is not None for run in runs):
        return _cross_validated_study(config, reporter, plan, runs, named)
    baseline = any(arm.kind == "scratch" for arm in plan.arms)
    seeds = plan.primary.seeds
    extra = [ArmRuns(named[arm.name]) for arm in plan.arms if arm.kind in ("parent", "model", "as_is")]
    by_name = {runs_of.arm.name: runs_of for runs_of in extra}
    transferred: list[FinetuneResult] = []
    scratch: list[FinetuneResult] = []
    as_is = _as_is_rows(config, extra, config.evaluation or config.train)
    for index, run in enumerate(runs):
        result = recipe_for(
            run_config(config, run, named),
            RunReporter(reporter, run.name, index, len(runs), primary=run.primary),
        ).run()
        if run.kind == "transferred":
            transferred.append(result)
        elif run.kind == "scratch":
            scratch.append(result)
        else:
            by_name[run.arm].correct.append(_compared(result, config))
        last_of_seed = index + 1 == len(runs) or runs[index + 1].seed != run.seed
        if last_of_seed and as_is is not None:
            # Every example of the evaluation dataset, or this seed's validation examples.
            positions = (
                range(len(as_is)) if config.evaluation is not None else transferred[-1].validation_positions
            )
            for runs_of in extra:
                if runs_of.arm.kind == "as_is":
                    runs_of.correct.append([as_is[p] for p in positions])
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
        report = _report(config, reporter, plan, seeds, transferred, scratch, held_out, extra, compared)
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
    plan: JobPlan,
    seeds: list[int],
    transferred: list[FinetuneResult],
    scratch: list[FinetuneResult],
    held_out: tuple[dict[str, Any], list[list[int]], list[list[int]]] | None,
    extra: list[ArmRuns] | None = None,
    transferred_correct: list[list[int]] | None = None,
) -> dict[str, Any]:
    # The compared runs' arms (a cross-validation's fold runs, not the job's own model on all labels).
    transferred_hp, scratch_hp = plan.arm("transferred").hyperparameters, plan.arm("scratch").hyperparameters
    budget = {
        "epochs": transferred_hp["epochs"],
        "batch_size": transferred_hp["batch_size"],
        "transferred": {
            "base_model": config.base.id,
            "method": config.method,
            "learning_rate": transferred_hp["learning_rate"],
        },
        "scratch": {
            "architecture": config.base.spec.architecture,
            "method": "full",
            "learning_rate": scratch_hp["learning_rate"],
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
    config: FinetuneConfig, reporter: Reporter, plan: JobPlan, runs: list[PlannedRun], named: dict[str, Arm]
) -> StudyResult:
    from ml.data import label_indices, read_labels, stratified_folds

    labels = label_indices(read_labels(config.train), config.classes or config.train.classes)
    n = len(labels)
    folded = [arm for arm in plan.arms if arm.folds]
    seeds, folds = folded[0].seeds, folded[0].folds
    partitions = {seed: stratified_folds(labels, folds, seed) for seed in seeds}
    extra = [ArmRuns(named[arm.name]) for arm in plan.arms if arm.kind in ("parent", "model", "as_is")]
    as_is = _as_is_rows(config, extra, config.train)
    rows = {seed: {arm.name: [0] * n for arm in folded} for seed in seeds}
    result: FinetuneResult | None = None
    transferred_runs: list[FinetuneResult] = []
    scratch_runs: list[FinetuneResult] = []
    for index, run in enumerate(runs):
        reporting = RunReporter(reporter, run.name, index, len(runs), primary=run.primary)
        if run.fold is None:  # the job's own model: every label (the estimate comes from the folds)
            result = recipe_for(run_config(config, run, named), reporting).run()
            continue
        held = set(partitions[run.seed][run.fold])
        split = ([i for i in range(n) if i not in held], sorted(held))
        outcome = recipe_for(
            run_config(config, run, named).model_copy(update={"split": split}), reporting
        ).run()
        if run.kind == "transferred":
            transferred_runs.append(outcome)
        elif run.kind == "scratch":
            scratch_runs.append(outcome)
        for position, right in zip(outcome.validation_positions, outcome.validation_correct, strict=True):
            rows[run.seed][run.arm][position] = right
    assert result is not None
    for runs_of in extra:
        for seed in seeds:
            kept = (
                as_is if runs_of.arm.kind == "as_is" and as_is is not None else rows[seed][runs_of.arm.name]
            )
            runs_of.correct.append(list(kept))
    transferred_correct = [rows[seed]["transferred"] for seed in seeds]
    scratch_correct = [rows[seed]["scratch"] for seed in seeds]
    measured_on = {"kind": "cross_validation", "folds": folds, "examples": n}
    report = _report(
        config,
        reporter,
        plan,
        [seed for seed in seeds for _ in range(folds)],
        transferred_runs,
        scratch_runs,
        (measured_on, transferred_correct, scratch_correct),
        extra,
        transferred_correct,
    )
    return StudyResult(result=result, report=report)
