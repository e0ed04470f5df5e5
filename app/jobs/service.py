"""Job rules: check everything a job needs before it is queued; commit the row, then send its id."""

from __future__ import annotations

import hashlib
import json
import math
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal, cast

from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.core.errors import Conflict, NotFound, Unprocessable, not_found
from app.core.security import Principal
from app.datasets import service as datasets
from app.jobs.schemas import METHOD_KEYS, AdaptJobCreate, DistillJobCreate, JobCreate, TrainingJobCreate
from app.models import service as models
from app.models.fit import check_fits
from graft import job_store
from graft.catalog import BUILTIN_MODELS, LORA_TARGET_MODULES
from graft.db import after_commit
from graft.defaults import (
    ADAPT_FROZEN_LEARNING_RATE,
    ADAPTER_HIDDEN,
    BACKBONE_METHOD,
    HEAD_WARMUP_EPOCHS,
    MIN_VALIDATION_PER_CLASS,
    default_backbone,
    default_hyperparameters,
    epochs_for,
    report_folds,
    split_can_choose,
)
from graft.jobspec import (
    AdaptHyperparameters,
    AdaptSpec,
    Backbone,
    DistillHyperparameters,
    DistillSpec,
    FinetuneHyperparameters,
    JobSpec,
    Student,
    TrainingMethod,
    TrainingSpec,
)
from graft.queueing import JobQueue
from graft.spec import SPEC_METADATA_KEY, ModelSpec
from graft.storage import Storage
from graft.tables import Checkpoint, Dataset, Job


@dataclass(frozen=True)
class Plan:
    """A kind's planner's answer: the job's resolved spec, its first event, and the transfer plan (which
    head, which classes) the report starts from."""

    spec: JobSpec
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


def request_fingerprint(body: JobCreate) -> str:
    canonical = json.dumps(body.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


@dataclass
class Upstream:
    """What a job starts from, as far as the rules need to know."""

    base_model: str  # recorded on the job: a built-in id or an mdl_ id
    architecture: str
    modality: str
    has_weights: bool  # learned weights (a pretrained built-in, a registered model, a checkpoint)
    classes: list[str]  # the source head's classes; empty when there is no head
    feature_columns: list[str]


def _upstream(session: Session, storage: Storage, principal: Principal, body: TrainingJobCreate) -> Upstream:
    if body.from_checkpoint is not None:
        checkpoint = get_checkpoint(session, principal, body.from_checkpoint, param="from_checkpoint")
        source = job_store.get(session, principal.project_id, checkpoint.job_id)
        assert source is not None
        if body.base_model is not None and body.base_model != source.base_model:
            raise Unprocessable(
                f"checkpoint {checkpoint.id} comes from a job on {source.base_model}, not {body.base_model}; "
                "leave base_model out",
                param="base_model",
                code="checkpoint_mismatch",
            )
        spec = _checkpoint_spec(storage, checkpoint)
        return Upstream(
            base_model=source.base_model,
            architecture=spec.architecture,
            modality=spec.modality,
            has_weights=True,
            classes=list(spec.classes),
            feature_columns=list(spec.input_spec.get("feature_columns", [])),
        )
    if body.base_model is None:
        raise Unprocessable(
            "base_model is required (or start from_checkpoint)", param="base_model", code="invalid_request"
        )
    return _model_upstream(
        session,
        principal,
        body.base_model,
        random_start=body.type == "pretrain" and body.initialization == "random",
    )


def _model_upstream(
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
    )


def _checkpoint_spec(storage: Storage, checkpoint: Checkpoint) -> ModelSpec:
    from safetensors import safe_open

    with safe_open(str(storage.path(checkpoint.path)), framework="pt") as handle:
        return ModelSpec.from_metadata((handle.metadata() or {})[SPEC_METADATA_KEY])


def _check_dataset_fits(
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


def resolve_hyperparameters(
    architecture: str,
    method: str,
    given: dict[str, Any],
    *,
    train_examples: int | None = None,
    fine_tunes_learned_weights: bool = False,
) -> dict[str, Any]:
    """Defaults for the architecture and method, what the client sent on top. Unless the client chose the
    epochs, a small dataset gets enough of them for a reasonable number of steps. Fine-tuning learned
    weights keeps their batch-norm statistics; pretraining and training from scratch learn them."""
    resolved = default_hyperparameters(architecture, method, learned=fine_tunes_learned_weights)
    resolved.update({key: value for key, value in given.items() if value is not None})
    if "epochs" not in given and train_examples is not None:
        resolved["epochs"] = epochs_for(resolved["epochs"], resolved["batch_size"], train_examples)
    resolved.setdefault("freeze_batch_norm", fine_tunes_learned_weights)
    return resolved


def _check_method(body: TrainingJobCreate, upstream: Upstream, given: dict[str, Any]) -> None:
    builtin = BUILTIN_MODELS[upstream.architecture]
    if body.method == "self_supervised":
        if body.type != "pretrain":
            raise Unprocessable(
                "self_supervised is a pretraining method: use it with type pretrain",
                param="method",
                code="method_not_supported",
            )
        for field in ("validation_dataset", "head"):
            if getattr(body, field) is not None:
                raise Unprocessable(
                    f"{field} does not apply to self-supervised pretraining (no labels, no head)",
                    param=field,
                    code="invalid_request",
                )
    allowed = builtin.architecture_methods if upstream.has_weights else ("full",)
    if body.method != "self_supervised" and body.method not in allowed:
        reason = (
            f"{upstream.base_model} starts from random weights, so {body.method} would train on random features"
            if not upstream.has_weights
            else f"{body.method} is not offered for {upstream.architecture}"
        )
        raise Unprocessable(
            f"{reason}; use one of: {', '.join(allowed)}", param="method", code="method_not_supported"
        )
    for key in sorted({k for keys in METHOD_KEYS.values() for k in keys} & set(given)):
        if key not in METHOD_KEYS[body.method]:
            accepting = " or ".join(m for m, keys in METHOD_KEYS.items() if key in keys)
            raise Unprocessable(
                f"{key} applies to method {accepting}, not {body.method}",
                param=f"hyperparameters.{key}",
                code="invalid_request",
            )
    targets = given.get("lora_target_modules")
    if targets is not None:
        # Checked against static names (no network is built here): the worker would only find out when
        # peft refuses a name, or the network breaks in its first forward pass, after the job started.
        valid = LORA_TARGET_MODULES.get(upstream.architecture, ())
        unknown = [name for name in targets if name not in valid]
        if unknown:
            raise Unprocessable(
                f"{upstream.architecture} has no module '{unknown[0]}' that LoRA can adapt; use one or more "
                f"of: {', '.join(valid)}",
                param="hyperparameters.lora_target_modules",
                code="invalid_request",
            )
    blocks = given.get("unfreeze_blocks")
    if blocks is not None and blocks > builtin.num_blocks:
        raise Unprocessable(
            f"{upstream.architecture} has {builtin.num_blocks} blocks; unfreeze_blocks is {blocks}",
            param="hyperparameters.unfreeze_blocks",
            code="invalid_request",
        )


def _check_options(
    body: TrainingJobCreate, upstream: Upstream, train: Dataset, hyperparameters: dict[str, Any]
) -> dict[str, Any]:
    """Head, initialization, baseline and seeds; returns the transfer the job is expected to make."""
    if body.initialization is not None and body.type != "pretrain":
        raise Unprocessable(
            "initialization applies to pretrain jobs", param="initialization", code="invalid_request"
        )
    if body.initialization == "random" and body.base_model not in BUILTIN_MODELS:
        raise Unprocessable(
            "a random initialization needs a built-in architecture as base_model (e.g. cnn-small)",
            param="initialization",
            code="invalid_request",
        )
    if body.head == "keep":
        if not upstream.classes:
            raise Unprocessable(
                f"{upstream.base_model} has no classification head to keep",
                param="head",
                code="invalid_request",
            )
        if not set(upstream.classes) & set(train.classes):
            raise Unprocessable(
                "the base model's classes and the dataset's have no name in common; a kept head would match none",
                param="head",
                code="invalid_request",
            )
    if body.baseline:
        if body.type != "finetune":
            raise Unprocessable("baseline applies to finetune jobs", param="baseline", code="invalid_request")
        if not upstream.has_weights:
            raise Unprocessable(
                f"{upstream.base_model} has random weights: there is no transfer to compare with training from "
                "scratch",
                param="baseline",
                code="invalid_request",
            )
        if (
            body.validation_dataset is None
            and body.evaluation_dataset is None
            and not hyperparameters["validation_split"]
            and hyperparameters.get("cross_validation_folds", 0) < 2
        ):
            raise Unprocessable(
                "the report compares the arms on held-out data: give an evaluation_dataset, a "
                "validation_dataset, a validation_split above 0 or cross_validation_folds of 2 or more",
                param="baseline",
                code="invalid_request",
            )
    if body.seeds is not None and not body.baseline:
        needs = (
            "set baseline to true"
            if upstream.has_weights
            else f"which needs learned weights, and {upstream.base_model} has random ones: leave seeds out"
        )
        raise Unprocessable(
            f"seeds repeat the baseline comparison (transfer against training from scratch), {needs}",
            param="seeds",
            code="invalid_request",
        )
    return _transfer(upstream, train, body.head)


def _check_companion(
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


def _training_dataset(
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
    _check_dataset_fits(train, upstream, param, labelled=labelled, mismatch_param=mismatch_param)
    if train.num_examples < 2:
        raise Unprocessable(
            f"dataset {train.id} has {train.num_examples} example; at least 2 are needed", param=param
        )
    return train


def _budget(
    architecture: str,
    given: dict[str, Any],
    train: Dataset,
    *,
    held_out: bool,
    learned: bool,
    method: str = "full",
) -> dict[str, Any]:
    train_examples = _train_examples(architecture, given, train, held_out=held_out, method=method)
    return resolve_hyperparameters(
        architecture, method, given, train_examples=train_examples, fine_tunes_learned_weights=learned
    )


def _default_epochs(
    architecture: str, given: dict[str, Any], train: Dataset, *, held_out: bool, method: str = "full"
) -> int:
    """The epochs the job would get had the client left them out (scaled to the dataset)."""
    rest = {key: value for key, value in given.items() if key != "epochs"}
    return int(_budget(architecture, rest, train, held_out=held_out, learned=False, method=method)["epochs"])


def _train_examples(
    architecture: str, given: dict[str, Any], train: Dataset, *, held_out: bool, method: str = "full"
) -> int:
    """The examples a run trains on: all of them beside held-out validation data, else what the split
    leaves."""
    split = given.get("validation_split", default_hyperparameters(architecture, method)["validation_split"])
    return train.num_examples if held_out else int(train.num_examples * (1 - split))


JobKind = Literal["finetune", "pretrain", "adapt", "distill"]


@dataclass(frozen=True)
class BudgetLimits:
    epoch_passes: int = MAX_EPOCH_PASSES
    optimizer_steps: int = MAX_OPTIMIZER_STEPS


@dataclass(frozen=True)
class TrainingBudget:
    """How much training a job makes, counted the way its recipe runs it."""

    epochs: int
    seeds: int
    arms: tuple[str, ...]  # the runs made for each seed, each `epochs` long
    warmup_epochs: int  # head warm-up epochs of each run that fits a new head first
    warmup_arms: int  # how many of the runs of a seed do
    train_examples: int
    batch_size: int
    steps_per_epoch: int
    # A cross-validated comparison (transfer.py, _cross_validated_study): for each seed both arms train k
    # times on k-1 folds (k-1 passes over the data per epoch in all), then the job's model once on all.
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


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def training_budget(
    kind: JobKind,
    method: str,
    hyperparameters: Mapping[str, Any],
    train_examples: int,
    *,
    seeds: int = 1,
    baseline: bool = False,
    baseline_arms: Sequence[str] = (),
    adaptation_methods: Sequence[str] = (),
    labelled: bool = True,
    warm_start: bool = False,
    folds: int = 0,
) -> TrainingBudget:
    """The training a job of this kind makes with these resolved hyperparameters. `warm_start`: the model
    starts from learned weights under a new head.

    The runs, as the recipes make them: finetune (workers/recipes/study.py, run_study) trains the
    transferred model and, with baseline, the architecture from scratch, for each seed; pretrain is one
    run; adapt (adapt.py, run_adaptation) trains source_only and each method, for each seed; distill
    (distill.py, run_distillation) trains the distilled student and, when the transfer data have labels,
    the student alone (the teacher only predicts, once). The head warm-up (finetune.py, _warm_up_head) is
    extra epochs over the training data before a run that starts from learned weights with a new head and
    moves the backbone: the transferred run of a finetune or pretrain job (not its scratch baseline, whose
    weights are random), and every run of an adapt or distill job (their method is full). warmup_ratio
    adds nothing: it is a share of a run's own steps.
    """
    if kind == "finetune":
        arms: tuple[str, ...] = ("transferred", "scratch baseline") if baseline else ("transferred",)
        # Named arms that train (parent, other models) cost a run each; as_is only predicts.
        arms += tuple(arm for arm in baseline_arms if arm not in ("scratch", "as_is"))
        warmup_arms = 1 + len(arms) - (2 if baseline else 1)
    elif kind == "pretrain":
        arms, warmup_arms = ("pretraining",), 1
    elif kind == "adapt":
        arms = ("source_only", *adaptation_methods)
        warmup_arms = len(arms)
    else:
        arms = ("distilled student", "student alone") if labelled else ("distilled student",)
        warmup_arms = len(arms)
    warmup_epochs = int(hyperparameters.get("head_warmup_epochs") or 0)
    if not warm_start or method in ("linear_probe", "self_supervised") or not warmup_epochs:
        warmup_arms, warmup_epochs = 0, 0
    batch_size = int(hyperparameters["batch_size"])
    if method == "self_supervised":
        # Contrastive batches need two examples: the last, smaller batch is dropped (self_supervised.py).
        steps_per_epoch = max(1, train_examples // max(1, min(batch_size, train_examples)))
    else:
        steps_per_epoch = max(1, math.ceil(train_examples / batch_size))
    return TrainingBudget(
        epochs=int(hyperparameters["epochs"]),
        seeds=seeds,
        arms=arms,
        warmup_epochs=warmup_epochs,
        warmup_arms=warmup_arms,
        train_examples=train_examples,
        batch_size=batch_size,
        steps_per_epoch=steps_per_epoch,
        folds=folds,
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


def _report_folds(
    body: TrainingJobCreate, train: Dataset, given: dict[str, Any], hyperparameters: dict[str, Any]
) -> int:
    """The folds of the cross-validation that measures the baseline comparison (0: none)."""
    asked = given.get("cross_validation_folds")
    applies = body.type == "finetune" and body.baseline
    held_out = body.validation_dataset is not None or body.evaluation_dataset is not None
    if asked is not None:
        if asked and (not applies or held_out):
            raise Unprocessable(
                "cross_validation_folds measures a baseline comparison over the training labels: it applies to "
                "finetune jobs with baseline true and no validation_dataset or evaluation_dataset",
                param="hyperparameters.cross_validation_folds",
                code="invalid_request",
            )
        if asked == 1:
            raise Unprocessable(
                "cross_validation_folds is 0 (none) or 2 or more: one fold would train on nothing",
                param="hyperparameters.cross_validation_folds",
                code="invalid_request",
            )
        return int(asked)
    if not applies or held_out or "validation_split" in given:
        return 0  # no comparison, or held-out data the client chose
    return report_folds(dict(train.class_counts or {}), float(hyperparameters["validation_split"]))


SEMI_SUPERVISED_DEFAULTS = {"unlabeled_weight": 1.0, "confidence_threshold": 0.95, "unlabeled_ratio": 3}


def _semi_supervised(
    session: Session,
    principal: Principal,
    body: TrainingJobCreate,
    train: Dataset,
    upstream: Upstream,
    given: dict[str, Any],
    self_supervised: bool,
) -> dict[str, Any]:
    """The unlabelled data's settings (defaults for those not given), checked; none without the data."""
    settings = {key: given[key] for key in SEMI_SUPERVISED_DEFAULTS if key in given}
    if body.unlabeled_dataset is None:
        if settings:
            key = next(iter(settings))
            raise Unprocessable(
                f"{key} applies to semi-supervised fine-tuning: give an unlabeled_dataset",
                param=f"hyperparameters.{key}",
                code="invalid_request",
            )
        return {}
    if body.type != "finetune" or self_supervised:
        raise Unprocessable(
            "unlabeled_dataset applies to finetune jobs (self-supervised pretraining takes unlabelled data as "
            "its training_dataset)",
            param="unlabeled_dataset",
            code="invalid_request",
        )
    if body.unlabeled_dataset == train.id:
        raise Unprocessable(
            "the unlabeled dataset is the training dataset: its examples are already labelled",
            param="unlabeled_dataset",
            code="invalid_request",
        )
    _check_companion(
        session, principal, body.unlabeled_dataset, train, upstream, "unlabeled_dataset", labelled=False
    )
    return {**SEMI_SUPERVISED_DEFAULTS, **settings}


MAX_BASELINE_ARMS = 4


def _baseline_arms(
    session: Session, principal: Principal, body: TrainingJobCreate, upstream: Upstream, train: Dataset
) -> list[str] | None:
    """The arms a baseline list names, checked: "scratch" first (always run), then "parent" (the base
    model's own upstream, with learned weights), "as_is" (the upstream's head names the dataset's classes)
    and model ids (models that fit the dataset). None without a list."""
    if not isinstance(body.baseline, list):
        return ["scratch"] if body.baseline else None
    named = list(body.baseline)
    if not named:
        raise Unprocessable(
            "baseline is true, false or a list of arms (scratch, parent, as_is, model ids)",
            param="baseline",
            code="invalid_request",
        )
    if len(named) > MAX_BASELINE_ARMS:
        raise Unprocessable(
            f"baseline names at most {MAX_BASELINE_ARMS} arms ({len(named)} given)",
            param="baseline",
            code="invalid_request",
        )
    if len(set(named)) != len(named):
        raise Unprocessable("baseline arms must be distinct", param="baseline", code="invalid_request")
    for position, arm in enumerate(named):
        param = f"baseline.{position}"
        if arm == "scratch":
            continue
        if arm == "as_is":
            if not upstream.classes or sorted(upstream.classes) != sorted(train.classes):
                raise Unprocessable(
                    f"as_is predicts with the upstream's own head, and {upstream.base_model}'s classes are not "
                    f"the dataset's ({', '.join(train.classes[:5])})",
                    param=param,
                    code="invalid_request",
                )
        elif arm == "parent":
            _check_parent(session, principal, upstream, param)
        else:
            if arm == upstream.base_model:
                raise Unprocessable(f"{arm} is the job's own base model", param=param, code="invalid_request")
            other = _model_upstream(session, principal, arm, param=param)
            if not other.has_weights:
                raise Unprocessable(
                    f"{arm} has random weights: that arm is scratch", param=param, code="invalid_request"
                )
            _check_dataset_fits(train, other, "training_dataset", mismatch_param=param)
    return ["scratch", *[arm for arm in named if arm != "scratch"]]


def _check_parent(session: Session, principal: Principal, upstream: Upstream, param: str) -> None:
    """The base model has a parent arm: the model the job that made it started from (`base_model` of its
    row, which the worker trains), with learned weights."""
    if upstream.base_model in BUILTIN_MODELS:
        raise Unprocessable(
            f"{upstream.base_model} is a built-in: it has no parent model in this project",
            param=param,
            code="invalid_request",
        )
    row = models.resolve(session, principal, upstream.base_model).row
    assert row is not None
    maker = job_store.get(session, principal.project_id, row.job_id) if row.job_id else None
    parent = row.base_model
    if parent is None or maker is None:
        raise Unprocessable(
            f"{upstream.base_model} was not made by a job of this project that is still here: its parent is "
            "unknown",
            param=param,
            code="invalid_request",
        )
    builtin = BUILTIN_MODELS.get(parent)
    if (builtin is not None and not builtin.pretrained) or maker.initialization == "random":
        raise Unprocessable(
            f"{upstream.base_model} was trained from random weights: its parent is the scratch arm",
            param=param,
            code="invalid_request",
        )


def _transfer(upstream: Upstream, train: Dataset, head: str | None) -> dict[str, Any]:
    same_labels = bool(upstream.classes) and sorted(upstream.classes) == sorted(train.classes)
    keep = head == "keep" or (head is None and same_labels)
    return {"kind": "domain" if same_labels else "task", "head": "keep" if keep else "new"}


def _training_job(
    session: Session, storage: Storage, principal: Principal, body: TrainingJobCreate, limits: BudgetLimits
) -> Plan:
    upstream = _upstream(session, storage, principal, body)
    self_supervised = body.method == "self_supervised"
    train = _training_dataset(
        session, principal, body.training_dataset, upstream, "training_dataset", labelled=not self_supervised
    )
    given = body.hyperparameters.model_dump(exclude_none=True)
    _check_method(body, upstream, given)
    if body.validation_dataset is not None:
        _check_companion(session, principal, body.validation_dataset, train, upstream, "validation_dataset")
    if body.evaluation_dataset is not None:
        if body.type != "finetune" or self_supervised:
            raise Unprocessable(
                "evaluation_dataset applies to finetune jobs",
                param="evaluation_dataset",
                code="invalid_request",
            )
        _check_companion(session, principal, body.evaluation_dataset, train, upstream, "evaluation_dataset")
    semi = _semi_supervised(session, principal, body, train, upstream, given, self_supervised)
    unheld = _unheld_split(body, train, given, upstream.architecture)
    planned = {**given, **unheld}  # what the budget counts: the labels the run trains on
    hyperparameters = {
        **_budget(
            upstream.architecture,
            planned,
            train,
            held_out=body.validation_dataset is not None,
            learned=body.type == "finetune" and upstream.has_weights,
            method=body.method,
        ),
        **semi,
    }
    folds = _report_folds(body, train, given, hyperparameters)
    if folds or "cross_validation_folds" in given:
        hyperparameters["cross_validation_folds"] = folds  # recorded where it applies
    transfer: dict[str, Any] | None = _check_options(body, upstream, train, hyperparameters)
    arms = _baseline_arms(session, principal, body, upstream, train)
    if self_supervised:
        transfer = None  # no head: nothing to keep or replace
    held_out = body.validation_dataset is not None or self_supervised  # self-supervision trains on all
    budget = training_budget(
        body.type,
        body.method,
        hyperparameters,
        _train_examples(upstream.architecture, planned, train, held_out=held_out, method=body.method),
        seeds=len(body.seeds) if body.seeds else 1,
        baseline=bool(body.baseline),
        baseline_arms=arms or (),
        warm_start=upstream.has_weights and transfer is not None and transfer["head"] == "new",
        folds=folds,
    )
    check_budget(
        budget,
        limits,
        given,
        default_epochs=_default_epochs(
            upstream.architecture, planned, train, held_out=held_out, method=body.method
        ),
        default_batch_size=default_hyperparameters(upstream.architecture, body.method)["batch_size"],
    )
    initialization = body.initialization
    if body.type == "pretrain" and initialization is None:
        initialization = "pretrained" if upstream.has_weights else "random"
    spec = TrainingSpec(
        kind=body.type,
        base_model=upstream.base_model,
        from_checkpoint=body.from_checkpoint,
        initialization=initialization,
        method=body.method,
        training_dataset=train.id,
        validation_dataset=body.validation_dataset,
        evaluation_dataset=body.evaluation_dataset,
        unlabeled_dataset=body.unlabeled_dataset,
        head=body.head,
        baseline=bool(body.baseline),
        baseline_arms=arms,
        seeds=body.seeds,
        hyperparameters=FinetuneHyperparameters.model_validate(hyperparameters),
    )
    start = f"checkpoint {body.from_checkpoint}" if body.from_checkpoint else upstream.base_model
    what = {"pretrain": "pretraining", "finetune": f"{body.method} fine-tune"}[body.type]
    if self_supervised:
        what = "self-supervised pretraining"
    created = f"Job created: {what} of {start} on {train.id}"
    if unheld:
        default_split = default_hyperparameters(upstream.architecture, body.method)["validation_split"]
        created += (
            f"; all {train.num_examples} labelled examples train: a validation split of {default_split:g} "
            f"would hold about {round(train.num_examples * default_split)}, too few "
            f"(fewer than {MIN_VALIDATION_PER_CLASS} per class) to choose an epoch by, so the last epoch of the "
            "schedule is the result"
        )
    return Plan(spec, created, transfer)


def _unheld_split(
    body: TrainingJobCreate, train: Dataset, given: dict[str, Any], architecture: str
) -> dict[str, Any]:
    """A default validation split too small to choose an epoch by (fewer than MIN_VALIDATION_PER_CLASS
    examples per class) holds labels out for nothing when the job is measured on an evaluation_dataset:
    the result is the last epoch anyway, and the job's held-out figures come from the evaluation data. Then
    the run trains on every label (validation_split 0), as a practitioner with 40 labels would. Without
    an evaluation dataset the split stays: it is the job's only held-out figure. Not either when the client
    chose the split, a validation_dataset, the model selection or early stopping, nor for a baseline
    comparison, whose report follows both arms epoch by epoch on the validation data (with cross-validation
    its result model trains on every label already)."""
    counts = dict(train.class_counts or {})
    if (
        body.evaluation_dataset is None
        or body.method == "self_supervised"
        or body.baseline
        or body.validation_dataset is not None
        or not counts
        or "validation_split" in given
        or given.get("model_selection", "auto") != "auto"
        or given.get("early_stopping") is not None
    ):
        return {}
    split = float(default_hyperparameters(architecture, body.method)["validation_split"])
    return {} if split_can_choose(counts, split) else {"validation_split": 0.0}


ADAPTATION_DEFAULTS = {"adaptation_weight": 1.0, "pseudo_label_threshold": 0.9, "mcc_temperature": 2.5}
DISTILLATION_DEFAULTS = {"temperature": 4.0, "alpha": 0.5}
# A student matching soft targets needs longer than fine-tuning needs to fit labels: unless the client
# chose the epochs, distillation runs this many times the architecture's (data-scaled) default.
DISTILLATION_EPOCHS_FACTOR = 3


def _adapt_job(session: Session, principal: Principal, body: AdaptJobCreate, limits: BudgetLimits) -> Plan:
    upstream = _model_upstream(session, principal, body.base_model)
    source = _training_dataset(session, principal, body.source_dataset, upstream, "source_dataset")
    target = _check_companion(
        session, principal, body.target_dataset, source, upstream, "target_dataset", labelled=False
    )
    if target.id == source.id:
        raise Unprocessable(
            "the target dataset is the source dataset: there is no domain to adapt to",
            param="target_dataset",
            code="invalid_request",
        )
    if body.evaluation_dataset is not None:
        _check_companion(session, principal, body.evaluation_dataset, source, upstream, "evaluation_dataset")
    given = body.hyperparameters.model_dump(exclude_none=True)
    backbone, method = _backbone(body.backbone, upstream.architecture, upstream.has_weights)
    hyperparameters = {
        **ADAPTATION_DEFAULTS,
        **_budget(
            upstream.architecture, given, source, held_out=False, learned=upstream.has_weights, method=method
        ),
        **_adapter_width(backbone),
        **_adapt_rate(backbone, given),
    }
    transfer = _transfer(upstream, source, None)
    budget = training_budget(
        "adapt",
        method,
        hyperparameters,
        _train_examples(upstream.architecture, given, source, held_out=False, method=method),
        seeds=len(body.seeds) if body.seeds else 1,
        adaptation_methods=body.methods,
        warm_start=upstream.has_weights and transfer["head"] == "new",
    )
    check_budget(
        budget,
        limits,
        given,
        default_epochs=_default_epochs(upstream.architecture, given, source, held_out=False, method=method),
        default_batch_size=default_hyperparameters(upstream.architecture, method)["batch_size"],
        methods_param=True,
    )
    spec = AdaptSpec(
        kind="adapt",
        base_model=upstream.base_model,
        source_dataset=source.id,
        target_dataset=target.id,
        evaluation_dataset=body.evaluation_dataset,
        backbone=backbone,
        method=method,
        methods=list(body.methods),
        seeds=body.seeds,
        hyperparameters=AdaptHyperparameters.model_validate(hyperparameters),
    )
    return Plan(
        spec,
        f"Job created: adapt {upstream.base_model} from {source.id} to {target.id} with "
        f"{', '.join(body.methods)} beside source_only ({backbone} backbone)",
        transfer,
    )


def _backbone(choice: str | None, architecture: str, learned: bool) -> tuple[Backbone, TrainingMethod]:
    """The backbone an adapt or distill job trains ("frozen", "partial" or "full") and the training method
    it means. A frozen backbone needs learned weights: random features would stay random."""
    backbone = choice or (default_backbone(architecture) if learned else "full")
    if backbone == "frozen" and not learned:
        raise Unprocessable(
            f"backbone 'frozen' needs learned weights, and this {architecture} starts from random ones: train "
            "it ('full'), or start from a pretrained model",
            param="backbone",
            code="invalid_request",
        )
    return cast(Backbone, backbone), cast(TrainingMethod, BACKBONE_METHOD[backbone])


def _adapter_width(backbone: str) -> dict[str, Any]:
    return {"adapter_hidden": ADAPTER_HIDDEN} if backbone == "frozen" else {}


def _adapt_rate(backbone: str, given: dict[str, Any]) -> dict[str, Any]:
    """An adapt job's adapter and head over frozen features train at ADAPT_FROZEN_LEARNING_RATE unless
    the client chose the rate."""
    if backbone != "frozen" or "learning_rate" in given:
        return {}
    return {"learning_rate": ADAPT_FROZEN_LEARNING_RATE}


STUDENT_OPTIONS = {"layers": ("minilm-l6",), "width": ("cnn-small", "resnet-small"), "hidden": ("mlp",)}


def _distill_job(
    session: Session, principal: Principal, body: DistillJobCreate, limits: BudgetLimits
) -> Plan:
    teacher = _model_upstream(session, principal, body.teacher, param="teacher")
    if not teacher.classes:
        raise Unprocessable(
            f"{teacher.base_model} has no classification head to learn from; distil a fine-tuned model",
            param="teacher",
            code="invalid_request",
        )
    student = body.student
    builtin = BUILTIN_MODELS[student.architecture]
    if builtin.modality != teacher.modality:
        raise Unprocessable(
            f"the teacher is a {teacher.modality} model and {student.architecture} a {builtin.modality} one",
            param="student.architecture",
            code="modality_mismatch",
        )
    for option, architectures in STUDENT_OPTIONS.items():
        if getattr(student, option) is not None and student.architecture not in architectures:
            raise Unprocessable(
                f"{option} applies to a {' or '.join(architectures)} student, not {student.architecture}",
                param=f"student.{option}",
                code="invalid_request",
            )
    train = _training_dataset(
        session,
        principal,
        body.training_dataset,
        teacher,
        "training_dataset",
        labelled=False,
        mismatch_param="training_dataset",
    )
    unknown = sorted(set(train.classes) - set(teacher.classes)) if train.labeled else []
    if unknown:
        raise Unprocessable(
            f"dataset {train.id} has classes the teacher cannot predict: {', '.join(unknown[:5])}",
            param="training_dataset",
            code="classes_mismatch",
        )
    if body.evaluation_dataset is not None:
        _check_companion(
            session,
            principal,
            body.evaluation_dataset,
            train,
            teacher,
            "evaluation_dataset",
            classes=teacher.classes,
        )
    given = body.hyperparameters.model_dump(exclude_none=True)
    backbone, method = _backbone(body.backbone or "full", student.architecture, builtin.pretrained)
    hyperparameters = {
        **DISTILLATION_DEFAULTS,
        **_budget(
            student.architecture,
            given,
            train,
            held_out=body.evaluation_dataset is not None or not train.labeled,
            learned=builtin.pretrained,
            method=method,
        ),
        **_adapter_width(backbone),
    }
    if "epochs" not in given:
        hyperparameters["epochs"] = min(hyperparameters["epochs"] * DISTILLATION_EPOCHS_FACTOR, 1000)
    if body.evaluation_dataset is None and (not train.labeled or not hyperparameters["validation_split"]):
        raise Unprocessable(
            "the report compares teacher and students on labelled data: give an evaluation_dataset, or labelled "
            "transfer data with a validation_split above 0",
            param="evaluation_dataset",
            code="invalid_request",
        )
    held_out = body.evaluation_dataset is not None or not train.labeled
    budget = training_budget(
        "distill",
        method,
        hyperparameters,
        _train_examples(student.architecture, given, train, held_out=held_out, method=method),
        labelled=train.labeled,
        warm_start=builtin.pretrained,  # the student always gets a new head (the teacher's classes)
    )
    default_epochs = _default_epochs(student.architecture, given, train, held_out=held_out, method=method)
    check_budget(
        budget,
        limits,
        given,
        default_epochs=min(default_epochs * DISTILLATION_EPOCHS_FACTOR, 1000),
        default_batch_size=default_hyperparameters(student.architecture, method)["batch_size"],
    )
    spec = DistillSpec(
        kind="distill",
        teacher=teacher.base_model,
        student=Student.model_validate(student.model_dump(exclude_none=True)),
        training_dataset=train.id,
        evaluation_dataset=body.evaluation_dataset,
        backbone=backbone,
        method=method,
        hyperparameters=DistillHyperparameters.model_validate(hyperparameters),
    )
    return Plan(
        spec,
        f"Job created: distil {teacher.base_model} into a {student.architecture} student on {train.id} "
        f"({backbone} backbone)",
    )


def create_job(
    session: Session,
    storage: Storage,
    queue: JobQueue,
    principal: Principal,
    body: JobCreate,
    idempotency_key: str | None,
    *,
    max_epoch_passes: int = MAX_EPOCH_PASSES,
    max_optimizer_steps: int = MAX_OPTIMIZER_STEPS,
) -> tuple[Job, bool]:
    """The job, and whether it was created now (False: an earlier request with the same key made it).
    A job training more than `max_epoch_passes` passes over its data, or `max_optimizer_steps` steps, is
    refused."""
    fingerprint = request_fingerprint(body)
    if idempotency_key is not None:
        existing = job_store.by_idempotency_key(session, principal.project_id, idempotency_key)
        if existing is not None:
            return _replay(existing, fingerprint), False

    limits = BudgetLimits(epoch_passes=max_epoch_passes, optimizer_steps=max_optimizer_steps)
    if isinstance(body, AdaptJobCreate):
        plan = _adapt_job(session, principal, body, limits)
    elif isinstance(body, DistillJobCreate):
        plan = _distill_job(session, principal, body, limits)
    else:
        plan = _training_job(session, storage, principal, body, limits)
    job = job_store.new_job(
        principal.project_id,
        plan.spec,
        seed=body.seed if body.seed is not None else secrets.randbelow(2**32),
        transfer=plan.transfer,
        user_metadata=body.metadata,
        idempotency_key=idempotency_key,
        request_hash=fingerprint,
    )
    if idempotency_key is not None:
        try:
            with session.begin_nested():
                job_store.add(session, job)
        except IntegrityError:
            # A concurrent request with the same key won the insert.
            existing = job_store.by_idempotency_key(session, principal.project_id, idempotency_key)
            if existing is None:
                raise
            return _replay(existing, fingerprint), False
    else:
        job_store.add(session, job)
    job_store.add_event(session, job.id, plan.description)
    job_id = job.id
    after_commit(session, lambda: queue.send(job_id))
    return job, True


def _replay(existing: Job, fingerprint: str) -> Job:
    if existing.request_hash != fingerprint:
        raise Conflict(
            "this Idempotency-Key was used with a different request body",
            param="Idempotency-Key",
            code="idempotency_key_reused",
        )
    return existing


def get_job(session: Session, principal: Principal, job_id: str) -> Job:
    job = job_store.get(session, principal.project_id, job_id)
    if job is None:
        raise not_found("job", job_id)
    return job


def cancel_job(session: Session, principal: Principal, job_id: str) -> Job:
    """A queued job is cancelled at once and never starts; a running one is asked to stop and does so
    within a few steps (the training loop reads this flag), freeing its worker."""
    job = get_job(session, principal, job_id)
    if job_store.cancel(session, job.id) is None:
        session.refresh(job)
        raise Conflict(f"job {job.id} is already {job.status}", code="job_not_cancellable")
    session.refresh(job)
    return job


def get_checkpoint(
    session: Session, principal: Principal, checkpoint_id: str, param: str | None = None
) -> Checkpoint:
    row = job_store.get_checkpoint(session, principal.project_id, checkpoint_id)
    if row is None:
        raise not_found("checkpoint", checkpoint_id, param=param)
    return row


def report_of(job: Job) -> dict[str, Any]:
    if job.report is None:
        if job.type in ("adapt", "distill"):
            reason = f"the report is written when the job succeeds; it is {job.status}"
        elif not job.baseline:
            reason = (
                "this job has no report: create it with baseline true to compare with training from scratch"
            )
        else:
            reason = f"the report is written when the job succeeds; it is {job.status}"
        raise NotFound(reason, code="report_not_available")
    report = {"job_id": job.id, "kind": "transfer", **job.report}
    if report["kind"] == "adaptation":
        # JSON columns need not keep key order (PostgreSQL's JSONB does not): source_only first, then the
        # methods as requested.
        order = ["source_only", *(job.methods or [])]
        report["methods"] = {m: report["methods"][m] for m in order if m in report["methods"]}
    return report
