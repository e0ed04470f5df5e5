"""The planner of finetune and pretrain jobs: the method's and options' checks, the companion datasets
(validation, evaluation, unlabelled), the report's arms and folds, the defaults; its answer is a
`TrainingSpec`."""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session

from app.core.errors import Unprocessable
from app.core.security import Principal
from app.datasets import service as datasets
from app.jobs.planners.common import (
    BudgetLimits,
    Plan,
    Upstream,
    check_companion,
    check_dataset_fits,
    check_limits,
    epochs_by_default,
    labelled_training_dataset,
    model_upstream,
    network_for,
    request_upstream,
    resolved_budget,
    transfer_plan,
)
from app.jobs.schemas import METHOD_KEYS, TrainingJobCreate
from app.models import service as models
from graft import job_store
from graft.catalog import BUILTIN_MODELS, LORA_TARGET_MODULES
from graft.defaults import (
    MIN_VALIDATION_PER_CLASS,
    SEMI_SUPERVISED_DEFAULTS,
    default_hyperparameters,
    report_folds,
    split_can_choose,
    split_sizes,
)
from graft.jobspec import (
    FinetuneHyperparameters,
    TrainingSpec,
)
from graft.plan import DataFacts, JobPlan, plan_training
from graft.plan import Upstream as PlanUpstream
from graft.spec import ModelSpec
from graft.storage import Storage
from graft.tables import Dataset


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
            and hyperparameters.get("cross_validation_folds", 0) < 2
        ):
            split = float(hyperparameters["validation_split"])
            if not split:
                raise Unprocessable(
                    "the report compares the arms on held-out data: give an evaluation_dataset, a "
                    "validation_dataset, a validation_split above 0 or cross_validation_folds of 2 or more",
                    param="baseline",
                    code="invalid_request",
                )
            if not split_sizes(dict(train.class_counts or {}), split)[1]:
                raise Unprocessable(
                    f"the report compares the arms on held-out data, and a validation_split of {split:g} of "
                    f"dataset {train.id} holds no example (a class needs 2 examples, and a validation share "
                    "of at least one, to lend one): give an evaluation_dataset, a validation_dataset, a larger "
                    "validation_split or cross_validation_folds of 2 or more",
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
    return transfer_plan(upstream, train, body.head)


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
        counts = dict(train.class_counts or {})
        if asked and counts and asked > min(counts.values()):
            smallest = min(counts, key=lambda name: counts[name])
            raise Unprocessable(
                f"cross_validation_folds is {asked}, and class '{smallest}' of dataset {train.id} has "
                f"{counts[smallest]} example{'s' if counts[smallest] != 1 else ''}: every fold must hold each "
                f"class once at least, so at most {counts[smallest]} folds"
                + (
                    ""
                    if counts[smallest] >= 2
                    else " (too few to cross-validate: give an evaluation_dataset)"
                ),
                param="hyperparameters.cross_validation_folds",
                code="invalid_request",
            )
        return int(asked)
    if not applies or held_out or "validation_split" in given:
        return 0  # no comparison, or held-out data the client chose
    return report_folds(dict(train.class_counts or {}), float(hyperparameters["validation_split"]))


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
    check_companion(
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
            other = model_upstream(session, principal, arm, param=param)
            if not other.has_weights:
                raise Unprocessable(
                    f"{arm} has random weights: that arm is scratch", param=param, code="invalid_request"
                )
            check_dataset_fits(train, other, "training_dataset", mismatch_param=param)
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


def plan(
    session: Session,
    storage: Storage,
    principal: Principal,
    body: TrainingJobCreate,
    limits: BudgetLimits,
    seed: int,
) -> Plan:
    upstream = request_upstream(session, storage, principal, body)
    self_supervised = body.method == "self_supervised"
    train = labelled_training_dataset(
        session, principal, body.training_dataset, upstream, "training_dataset", labelled=not self_supervised
    )
    given = body.hyperparameters.model_dump(exclude_none=True)
    _check_method(body, upstream, given)
    validation = evaluation = None
    if body.validation_dataset is not None:
        validation = check_companion(
            session, principal, body.validation_dataset, train, upstream, "validation_dataset"
        )
    if body.evaluation_dataset is not None:
        if body.type != "finetune" or self_supervised:
            raise Unprocessable(
                "evaluation_dataset applies to finetune jobs",
                param="evaluation_dataset",
                code="invalid_request",
            )
        evaluation = check_companion(
            session, principal, body.evaluation_dataset, train, upstream, "evaluation_dataset"
        )
    semi = _semi_supervised(session, principal, body, train, upstream, given, self_supervised)
    unheld = _unheld_split(body, train, given, upstream.architecture)
    planned = {**given, **unheld}  # what the budget counts: the labels the run trains on
    hyperparameters = {
        **resolved_budget(
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
    classes = 0 if self_supervised else len(train.classes)
    runs = plan_training(
        spec,
        seed,
        upstream=upstream.for_plan(train, classes),
        train=DataFacts.of(train),
        validation=DataFacts.of(validation) if validation is not None else None,
        evaluation=DataFacts.of(evaluation) if evaluation is not None else None,
        unlabeled=_facts(session, principal, body.unlabeled_dataset),
        scratch=network_for(
            ModelSpec.for_builtin(upstream.architecture), learned=False, data=train, classes=classes
        ),
        named=_named_upstreams(session, principal, upstream, arms or [], train),
    )
    check_limits(
        runs,
        limits,
        given,
        default_epochs=epochs_by_default(
            upstream.architecture, planned, train, held_out=held_out, method=body.method
        ),
        default_batch_size=default_hyperparameters(upstream.architecture, body.method)["batch_size"],
        seeds=len(body.seeds) if body.seeds else 1,
        pretraining=body.type == "pretrain",
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
    return Plan(spec, runs, created + _reading(runs, train), transfer)


def _facts(session: Session, principal: Principal, dataset_id: str | None) -> DataFacts | None:
    if dataset_id is None:
        return None
    return DataFacts.of(datasets.get_dataset(session, principal, dataset_id))


def _named_upstreams(
    session: Session, principal: Principal, upstream: Upstream, arms: list[str], train: Dataset
) -> dict[str, PlanUpstream]:
    """The upstream of each named arm that trains (parent, model ids), priced on the training data."""
    found: dict[str, PlanUpstream] = {}
    for name in arms:
        if name in ("scratch", "as_is"):
            continue
        model_id = name
        if name == "parent":
            row = models.resolve(session, principal, upstream.base_model).row
            assert row is not None and row.base_model is not None  # checked by _check_parent
            model_id = row.base_model
        other = model_upstream(session, principal, model_id)
        found[name] = other.for_plan(train, len(train.classes)).model_copy(update={"learned": True})
    return found


def _reading(runs: JobPlan, train: Dataset) -> str:
    """What the job's first event adds about how its network reads the images: the size a network that
    follows the data chose, and a warning when the images' sizes are far apart."""
    network = runs.primary.network
    sizes = (train.profile or {}).get("image_sizes")
    if network is None or network.side is None or not sizes or runs.primary.learned:
        return ""
    text = f". {network.architecture} reads the images at {network.side} px (their median shorter side)"
    return text + (f"; {sizes['warning']}" if sizes.get("warning") else "")


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
