"""What every kind's planner shares: the upstream a request names, the checks that a dataset fits it, the
resolved hyperparameters and the training budget a job may not exceed, and the planner's answer (`Plan`)."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, cast

from sqlalchemy.orm import Session

from app.core.errors import Unprocessable, not_found
from app.core.security import Principal
from app.datasets import service as datasets
from app.jobs.schemas import TrainingJobCreate
from app.models import service as models
from app.models.fit import check_fits
from graft import job_store
from graft.compute import Network
from graft.defaults import (
    ADAPTER_HIDDEN,
    BACKBONE_METHOD,
    HEAD_WARMUP_EPOCHS,
    default_backbone,
    default_hyperparameters,
    resolve_hyperparameters,
)
from graft.formats import ImageGeometry, geometry_of
from graft.jobspec import (
    Backbone,
    JobSpec,
    TrainingMethod,
)
from graft.plan import JobPlan
from graft.plan import Upstream as PlanUpstream
from graft.spec import SPEC_METADATA_KEY, ModelSpec
from graft.storage import Storage
from graft.tables import Checkpoint, Dataset


@dataclass(frozen=True)
class Plan:
    """A kind's planner's answer: the job's resolved spec, the plan of its runs, its first event, and the
    transfer plan (which head, which classes) the report starts from."""

    spec: JobSpec
    runs: JobPlan
    description: str
    transfer: dict[str, Any] | None = None


# The most training one job may ask for, counted in passes over its training examples: every run the job
# makes (its arms, for each seed) times the epochs, plus the head warm-up epochs of the runs that fit a new
# head first. Jobs with the default hyperparameters stay far below it (the most, a distilled mlp student
# on a tiny dataset, is 600); a 5-seed baseline study of 1,000 epochs (10,000) is refused.
MAX_EPOCH_PASSES = 2000


# The same in optimiser steps (epoch passes times batches per epoch): what bounds batch_size 1 over a large
# dataset, which a count of epochs cannot see. 2,000,000 steps are most of a day of minilm-l6 fine-tuning
# on one GPU; jobs with the default hyperparameters reach it only beyond about 180,000 training examples
# (a 5-seed baseline study) or 350,000 (a single job: an mlp distillation), far beyond Graft's small data.
MAX_OPTIMIZER_STEPS = 2_000_000

# And in estimated compute (graft/compute.py): hours of the reference machine (2 CPU cores) for every pass
# of every network a job runs, validation, warm-up, unlabelled batches and feature passes included. What
# epoch passes cannot see: the architecture (a pass of minilm-l6 costs ten thousand of an mlp's) and the
# size of the data. A GPU worker runs the same job many times faster: raise it there.
MAX_COMPUTE_HOURS = 24.0


@dataclass
class Upstream:
    """What a job starts from, as far as the rules need to know."""

    base_model: str  # recorded on the job: a built-in id or an mdl_ id
    architecture: str
    modality: str
    has_weights: bool  # learned weights (a pretrained built-in, a registered model, a checkpoint)
    classes: list[str]  # the source head's classes; empty when there is no head
    feature_columns: list[str]
    spec: ModelSpec  # its network (for a checkpoint, the checkpoint's)

    def for_plan(self, data: Dataset, classes: int, *, adapter: int | None = None) -> PlanUpstream:
        """This upstream as a plan's arm starts from it, with its network priced on `data`."""
        return PlanUpstream(
            id=self.base_model,
            learned=self.has_weights,
            architecture=self.architecture,
            network=network_for(
                self.spec, learned=self.has_weights, data=data, classes=classes, adapter=adapter
            ),
        )


def network_for(
    spec: ModelSpec, *, learned: bool, data: Dataset, classes: int, adapter: int | None = None
) -> Network:
    """The network a run trains on `data`, as priced: one from scratch whose shape follows the data is the
    one the worker builds (an mlp for its columns, a resnet-small for its images' size and colour)."""
    info = dict(data.schema_info or {})
    profile = dict(data.profile or {})
    if not learned and spec.architecture == "resnet-small":
        geometry = data_geometry(data)
        spec = spec.model_copy(
            update={
                "options": {**spec.options, "stem_stride": geometry.stem_stride},
                "input_spec": {
                    **spec.input_spec,
                    "height": geometry.side,
                    "width": geometry.side,
                    "channels": geometry.channels,
                },
            }
        )
    network = Network.of(
        spec,
        classes=classes,
        mean_text_chars=profile.get("mean_text_chars"),
        columns=len(info.get("feature_columns", [])) or None,
    )
    if adapter:
        network = network.model_copy(update={"options": {**network.options, "adapter": adapter}})
    return network


def data_geometry(data: Dataset) -> ImageGeometry:
    """The size a network that follows the data reads `data`'s images at: from what its upload recorded, or
    (a dataset uploaded before that) from its images' mean pixel count."""
    recorded = (data.profile or {}).get("image_sizes")
    if recorded and recorded.get("shorter_side"):
        return geometry_of(float(recorded["shorter_side"]["median"]), bool(recorded["grey"]))
    return geometry_of(math.sqrt((data.pixels or 0) / max(data.num_examples, 1)) or 32.0, False)


def request_upstream(
    session: Session, storage: Storage, principal: Principal, body: TrainingJobCreate
) -> Upstream:
    if body.from_checkpoint is not None:
        checkpoint = job_store.get_checkpoint(session, principal.project_id, body.from_checkpoint)
        if checkpoint is None:
            raise not_found("checkpoint", body.from_checkpoint, param="from_checkpoint")
        source = job_store.get(session, principal.project_id, checkpoint.job_id)
        assert source is not None
        # The network the checkpoint holds: a distill job's student, not its teacher.
        beneath = job_store.spec_of(source).checkpoint_base
        if body.base_model is not None and body.base_model != beneath:
            raise Unprocessable(
                f"checkpoint {checkpoint.id} holds a network of {beneath}, not {body.base_model}; "
                "leave base_model out",
                param="base_model",
                code="checkpoint_mismatch",
            )
        spec = checkpoint_spec(storage, checkpoint)
        return Upstream(
            base_model=beneath,
            architecture=spec.architecture,
            modality=spec.modality,
            has_weights=True,
            classes=list(spec.classes),
            feature_columns=list(spec.input_spec.get("feature_columns", [])),
            spec=spec,
        )
    if body.base_model is None:
        raise Unprocessable(
            "base_model is required (or start from_checkpoint)", param="base_model", code="invalid_request"
        )
    return model_upstream(
        session,
        principal,
        body.base_model,
        random_start=body.type == "pretrain" and body.initialization == "random",
    )


def model_upstream(
    session: Session,
    principal: Principal,
    model_id: str,
    *,
    random_start: bool = False,
    param: str = "base_model",
) -> Upstream:
    base = models.resolve(session, principal, model_id, param=param)
    return Upstream(
        base_model=base.id,
        architecture=base.architecture,
        modality=base.modality,
        has_weights=base.pretrained and not random_start,
        classes=list(base.spec.classes),
        feature_columns=list(base.spec.input_spec.get("feature_columns", [])) if base.row is not None else [],
        spec=base.spec,
    )


def checkpoint_spec(storage: Storage, checkpoint: Checkpoint) -> ModelSpec:
    from safetensors import safe_open

    path = storage.existing(checkpoint.path, f"the file of checkpoint {checkpoint.id}")
    with safe_open(str(path), framework="pt") as handle:
        return ModelSpec.from_metadata((handle.metadata() or {})[SPEC_METADATA_KEY])


def check_dataset_fits(
    dataset: Dataset,
    upstream: Upstream,
    param: str,
    *,
    labelled: bool = True,
    mismatch_param: str = "base_model",
) -> None:
    check_fits(
        dataset,
        upstream.base_model,
        upstream.modality,
        upstream.feature_columns,
        param=param,
        mismatch_param=mismatch_param,
        labels_for="training needs a labelled dataset" if labelled else None,
    )


def check_companion(
    session: Session,
    principal: Principal,
    dataset_id: str,
    train: Dataset,
    upstream: Upstream,
    param: str,
    *,
    labelled: bool = True,
    classes: list[str] | None = None,
) -> Dataset:
    """A dataset used beside the training dataset (validation, target, evaluation): the same task, the
    training data's feature columns, and (when labelled) no class the model cannot predict."""
    dataset = datasets.get_dataset(session, principal, dataset_id, param=param, for_update=True)
    if dataset.task != train.task:
        raise Unprocessable(
            f"dataset {dataset.id} is {dataset.task}, the training dataset {train.task}",
            param=param,
            code="task_mismatch",
        )
    columns = upstream.feature_columns
    if not columns and train.task == "tabular_classification":
        columns = list(train.schema_info["feature_columns"])  # what the model will be trained on
    check_fits(
        dataset,
        upstream.base_model,
        upstream.modality,
        columns,
        param=param,
        mismatch_param="base_model",
        labels_for="training needs a labelled dataset" if labelled else None,
        classes=(train.classes if classes is None else classes) if labelled else None,
    )
    return dataset


def labelled_training_dataset(
    session: Session,
    principal: Principal,
    dataset_id: str,
    upstream: Upstream,
    param: str,
    *,
    labelled: bool = True,
    mismatch_param: str = "base_model",
) -> Dataset:
    train = datasets.get_dataset(session, principal, dataset_id, param=param, for_update=True)
    check_dataset_fits(train, upstream, param, labelled=labelled, mismatch_param=mismatch_param)
    if train.num_examples < 2:
        raise Unprocessable(
            f"dataset {train.id} has {train.num_examples} example; at least 2 are needed", param=param
        )
    return train


def resolved_budget(
    architecture: str,
    given: dict[str, Any],
    train: Dataset,
    *,
    held_out: bool,
    learned: bool,
    method: str = "full",
) -> dict[str, Any]:
    train_examples = count_train_examples(architecture, given, train, held_out=held_out, method=method)
    return resolve_hyperparameters(
        architecture, method, given, train_examples=train_examples, fine_tunes_learned_weights=learned
    )


def epochs_by_default(
    architecture: str, given: dict[str, Any], train: Dataset, *, held_out: bool, method: str = "full"
) -> int:
    """The epochs the job would get had the client left them out (scaled to the dataset)."""
    rest = {key: value for key, value in given.items() if key != "epochs"}
    return int(
        resolved_budget(architecture, rest, train, held_out=held_out, learned=False, method=method)["epochs"]
    )


def count_train_examples(
    architecture: str, given: dict[str, Any], train: Dataset, *, held_out: bool, method: str = "full"
) -> int:
    """The examples a run trains on: all of them beside held-out validation data, else what the split
    leaves."""
    split = given.get("validation_split", default_hyperparameters(architecture, method)["validation_split"])
    return train.num_examples if held_out else int(train.num_examples * (1 - split))


@dataclass(frozen=True)
class BudgetLimits:
    epoch_passes: int = MAX_EPOCH_PASSES
    optimizer_steps: int = MAX_OPTIMIZER_STEPS
    compute_seconds: float = MAX_COMPUTE_HOURS * 3600


@dataclass(frozen=True)
class TrainingBudget:
    """How much training a job makes, read from its plan: its epoch passes (over the training examples of
    the job's own run) and optimiser steps, with the formula a client can check."""

    epochs: int
    seeds: int
    arms: tuple[str, ...]  # the runs made for each seed, each `epochs` long
    warmup_epochs: int  # head warm-up epochs of each run that fits a head first
    warmup_arms: int  # how many of the runs of a seed do
    train_examples: int
    batch_size: int
    steps_per_epoch: int
    # A cross-validated comparison (study.py, _cross_validated_study): for each seed every arm trains k times
    # on k-1 folds (k-1 passes over the data per epoch in all), then the job's model once on all.
    folds: int = 0

    @property
    def epoch_passes(self) -> int:
        per_seed = len(self.arms) * self.epochs + self.warmup_arms * self.warmup_epochs
        if not self.folds:
            return self.seeds * per_seed
        return (
            self.seeds * per_seed * (self.folds - 1)
            + self.epochs
            + self.warmup_epochs * min(1, self.warmup_arms)
        )

    @property
    def optimizer_steps(self) -> int:
        return self.epoch_passes * self.steps_per_epoch

    def formula(self) -> str:
        """How the epoch passes add up, for the client to check (epochs times seeds times arms, and so on)."""
        seeds = _count(self.seeds, "seed")
        text = f"{_count(self.epochs, 'epoch')}{TIMES}{seeds}{TIMES}{_count(len(self.arms), 'arm')}"
        if self.warmup_arms:
            warmup = _count(self.warmup_epochs, "head warm-up epoch")
            text += f" + {warmup}{TIMES}{seeds}{TIMES}{_count(self.warmup_arms, 'arm')}"
        if self.folds:
            text = (
                f"({text}){TIMES}{self.folds - 1} (the data of {self.folds - 1} of {self.folds} folds, "
                f"{self.folds} times) + the model on all labels"
            )
        return text


TIMES = " \N{MULTIPLICATION SIGN} "

# How the budget's formula names the arms of a study.
ARM_LABELS = {"scratch": "scratch baseline"}


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def budget_of(plan: JobPlan, *, pretraining: bool = False) -> TrainingBudget:
    """The job's epoch passes and optimiser steps, read from its plan: the arms trained for each seed (each
    fold's, when cross-validated), their epochs and head warm-up epochs, the job's own run's data."""
    trained = [arm for arm in plan.arms if arm.trains]
    folded = [arm for arm in trained if arm.folds]
    per_seed = folded or trained
    reference = per_seed[0]
    hp = reference.hyperparameters
    batch_size = int(hp["batch_size"])
    train_examples = plan.primary.examples.train
    if reference.method == "self_supervised":
        # Contrastive batches need two examples: the last, smaller batch is dropped (self_supervised.py).
        steps_per_epoch = max(1, train_examples // max(1, min(batch_size, train_examples)))
    else:
        steps_per_epoch = max(1, math.ceil(train_examples / batch_size))
    warming = [arm for arm in per_seed if arm.warmup_epochs]
    if pretraining:
        names: tuple[str, ...] = ("pretraining",)
    else:
        names = tuple(ARM_LABELS.get(arm.name, arm.name) for arm in per_seed)
    return TrainingBudget(
        epochs=int(hp["epochs"]),
        seeds=len(reference.seeds),
        arms=names,
        warmup_epochs=warming[0].warmup_epochs if warming else 0,
        warmup_arms=len(warming),
        train_examples=train_examples,
        batch_size=batch_size,
        steps_per_epoch=steps_per_epoch,
        folds=reference.folds,
    )


BUDGET_HINTS = {
    "hyperparameters.epochs": "Set fewer hyperparameters.epochs",
    "hyperparameters.head_warmup_epochs": "Set fewer hyperparameters.head_warmup_epochs",
    "hyperparameters.batch_size": "Set a larger hyperparameters.batch_size",
    "seeds": "Use fewer seeds",
    "methods": "Use fewer methods",
}


def check_budget(
    budget: TrainingBudget,
    limits: BudgetLimits,
    given: dict[str, Any],
    *,
    default_epochs: int,
    default_batch_size: int,
    methods_param: bool = False,
) -> None:
    """Refuse a job above the limits, naming the field that drives it: the first of the hyperparameters the
    client raised (epochs, head_warmup_epochs) or lowered (batch_size; first when only the steps are too
    many) whose default alone would bring the job within the limits, else the first multiplier (seeds,
    adaptation methods) whose minimum would, else hyperparameters.epochs."""

    def fits(candidate: TrainingBudget) -> bool:
        return (
            candidate.epoch_passes <= limits.epoch_passes
            and candidate.optimizer_steps <= limits.optimizer_steps
        )

    if fits(budget):
        return
    alternatives: list[tuple[str, TrainingBudget]] = []
    if "epochs" in given:
        alternatives.append(("hyperparameters.epochs", replace(budget, epochs=default_epochs)))
    if "head_warmup_epochs" in given and budget.warmup_arms:
        warmup = replace(budget, warmup_epochs=HEAD_WARMUP_EPOCHS)
        alternatives.append(("hyperparameters.head_warmup_epochs", warmup))
    if "batch_size" in given and default_batch_size > budget.batch_size:
        steps = max(1, math.ceil(budget.train_examples / default_batch_size))
        batch = replace(budget, batch_size=default_batch_size, steps_per_epoch=steps)
        # Small batches make many steps of few epochs: then the batch size is the first thing to look at.
        first = budget.epoch_passes <= limits.epoch_passes
        alternatives.insert(0 if first else len(alternatives), ("hyperparameters.batch_size", batch))
    if budget.seeds > 1:
        alternatives.append(("seeds", replace(budget, seeds=1)))
    if methods_param and len(budget.arms) > 2:
        one_method = replace(budget, arms=budget.arms[:2], warmup_arms=min(budget.warmup_arms, 2))
        alternatives.append(("methods", one_method))
    param = next((field for field, candidate in alternatives if fits(candidate)), "hyperparameters.epochs")
    arms = f"the arms: {', '.join(budget.arms)}"
    if budget.epoch_passes > limits.epoch_passes:
        found = (
            f"{budget.formula()} = {budget.epoch_passes} epoch passes; at most {limits.epoch_passes} ({arms})"
        )
    else:
        found = (
            f"{budget.epoch_passes} epoch passes{TIMES}{budget.steps_per_epoch} steps "
            f"({_count(budget.train_examples, 'training example')} in batches of {budget.batch_size}) = "
            f"{budget.optimizer_steps} optimiser steps; at most {limits.optimizer_steps} ({arms})"
        )
    raise Unprocessable(
        f"the job trains too long: {found}. {BUDGET_HINTS[param]}", param=param, code="budget_exceeded"
    )


def check_compute(
    plan: JobPlan, limits: BudgetLimits, given: dict[str, Any], *, seeds: int, methods: int = 1
) -> None:
    """Refuse a job whose estimated compute is above the limit, saying what each arm costs and naming the
    field that drives it: epochs or head warm-up epochs the client raised, else seeds, adaptation methods,
    else the training data."""
    seconds = plan.cost.seconds
    if seconds <= limits.compute_seconds:
        return
    warm = any(arm.warmup_epochs for arm in plan.arms)
    param, hint = next(
        (field, hint)
        for field, hint, applies in (
            ("hyperparameters.epochs", "Set fewer hyperparameters.epochs", "epochs" in given),
            (
                "hyperparameters.head_warmup_epochs",
                "Set fewer hyperparameters.head_warmup_epochs",
                "head_warmup_epochs" in given and warm,
            ),
            ("seeds", "Use fewer seeds", seeds > 1),
            ("methods", "Use fewer methods", methods > 1),
            ("training_dataset", "Train on fewer examples, or with a cheaper method (linear_probe)", True),
        )
        if applies
    )
    arms = ", ".join(
        f"{arm.name} {arm.cost.seconds / 3600:.1f} h ({_count(arm.runs, 'run')})"
        for arm in plan.arms
        if arm.cost.seconds >= 0.05 * seconds
    )
    raise Unprocessable(
        f"the job's estimated compute is {seconds / 3600:.1f} hours of the reference machine (2 CPU cores; "
        f"{plan.cost.tflop:.0f} TFLOP, {plan.cost.optimizer_steps} optimiser steps); at most "
        f"{limits.compute_seconds / 3600:g} (GRAFT_MAX_JOB_HOURS). By arm: {arms}. {hint}",
        param=param,
        code="budget_exceeded",
    )


def check_limits(
    plan: JobPlan,
    limits: BudgetLimits,
    given: dict[str, Any],
    *,
    default_epochs: int,
    default_batch_size: int,
    seeds: int,
    methods: int = 1,
    pretraining: bool = False,
) -> None:
    """Every limit a job's plan must keep: its epoch passes and optimiser steps, then its compute."""
    check_budget(
        budget_of(plan, pretraining=pretraining),
        limits,
        given,
        default_epochs=default_epochs,
        default_batch_size=default_batch_size,
        methods_param=methods > 1,
    )
    check_compute(plan, limits, given, seeds=seeds, methods=methods)


def transfer_plan(upstream: Upstream, train: Dataset, head: str | None) -> dict[str, Any]:
    same_labels = bool(upstream.classes) and sorted(upstream.classes) == sorted(train.classes)
    keep = head == "keep" or (head is None and same_labels)
    return {"kind": "domain" if same_labels else "task", "head": "keep" if keep else "new"}


def backbone_for(choice: str | None, architecture: str, learned: bool) -> tuple[Backbone, TrainingMethod]:
    """The backbone an adapt or distill job trains ("frozen", "partial" or "full") and the training method
    it means. A frozen backbone needs learned weights: random features would stay random."""
    backbone = choice or (default_backbone(architecture) if learned else "full")
    if backbone != "full" and not learned:
        # Frozen random layers would stay random: a frozen backbone's features, or partial's bottom blocks.
        raise Unprocessable(
            f"backbone '{backbone}' needs learned weights, and this {architecture} starts from random ones: "
            "train it in full ('full'), or start from a pretrained model",
            param="backbone",
            code="invalid_request",
        )
    return cast(Backbone, backbone), cast(TrainingMethod, BACKBONE_METHOD[backbone])


def adapter_width(backbone: str) -> dict[str, Any]:
    return {"adapter_hidden": ADAPTER_HIDDEN} if backbone == "frozen" else {}
