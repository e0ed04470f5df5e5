"""A job's runs, planned once.

The API's planner for a kind (app/jobs/planners/) resolves a request into the kind's spec (graft/jobspec.py)
and then into this plan: every run the job will make, grouped by arm (the transferred model, the scratch
baseline, another upstream, an adaptation method, the distilled student...), each arm with the model it
starts from, its method, the seeds and folds it runs for and every hyperparameter its runs train with,
resolved (the scratch arm's own learning rate, the head warm-up's, a DANN discriminator's), and the
examples each run touches. The plan is priced (graft/compute.py: forward and backward passes of each arm's
network over every example its runs touch, validation, head warm-up, unlabelled batches and feature passes
included, and every optimiser step), checked against the job limits, stored with the job (`jobs.plan`) and
shown in GET /v1/jobs/{id}. The worker runs exactly the runs of `JobPlan.runs()`, each with its arm's
hyperparameters, so what was priced and shown is what runs.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from graft.compute import Network, run_overhead_seconds, step_seconds, training_factor
from graft.defaults import HEAD_WARMUP_LEARNING_RATE, scratch_hyperparameters, split_sizes
from graft.jobspec import AdaptSpec, DistillSpec, EvaluateSpec, TrainingSpec, resolved

if TYPE_CHECKING:  # the rows' module needs SQLAlchemy, which the training side never imports
    from graft.tables import Dataset

# adapt: label-free diagnostics of each run's final model look at up to this many examples of each domain.
DIAGNOSTIC_EXAMPLES = 1000

ArmKind = Literal[
    "transferred",  # the job's upstream, trained with the job's method
    "scratch",  # the same architecture from random weights, trained in full
    "parent",  # the base model's own upstream, trained like the transferred arm
    "model",  # another model, trained like the transferred arm
    "as_is",  # the upstream with its own head: predicts, never trains
    "adaptation",  # an adaptation method (or source_only)
    "distilled",  # the student, taught by the teacher
    "student",  # the same student on the labels alone
    "self_supervised",  # self-supervised pretraining
    "evaluation",  # a model measured on a dataset: predicts, never trains
]


class DataFacts(BaseModel):
    """What a plan needs to know of a dataset."""

    model_config = ConfigDict(frozen=True)

    id: str = ""
    examples: int
    class_counts: dict[str, int] = Field(default_factory=dict)
    mean_text_chars: float | None = None
    columns: int | None = None

    @classmethod
    def of(cls, row: Dataset) -> DataFacts:
        info = dict(row.schema_info or {})
        return cls(
            id=row.id,
            examples=row.num_examples,
            class_counts=dict(row.class_counts or {}),
            mean_text_chars=(row.profile or {}).get("mean_text_chars"),
            columns=len(info["feature_columns"]) if "feature_columns" in info else None,
        )


class Examples(BaseModel):
    """The examples one run of an arm touches."""

    train: int = Field(default=0, description="Labelled examples it trains on, each epoch.")
    validation: int = Field(default=0, description="Examples it is validated on, each epoch.")
    evaluation: int = Field(
        default=0, description="Held-out examples it is measured on when it ends (adapt: each epoch too)."
    )
    unlabeled: int = Field(
        default=0,
        description="Unlabelled examples drawn each epoch (semi-supervised, adapt's target batches).",
    )
    embedded: int = Field(
        default=0,
        description="Examples a frozen backbone computes features of once (a linear probe's, a head warm-up's, "
        "the as_is arm's predictions).",
    )
    teacher: int = Field(default=0, description="distill: examples the teacher predicts.")


class Cost(BaseModel):
    """What runs cost, estimated: on the reference machine (graft/compute.py), for every run counted."""

    optimizer_steps: int = 0
    forward_examples: float = Field(default=0.0, description="Examples through a network without gradients.")
    training_examples: float = Field(default=0.0, description="Examples through a network with gradients.")
    tflop: float = 0.0
    seconds: float = Field(default=0.0, description="Estimated time on the reference machine (2 CPU cores).")

    def __add__(self, other: Cost) -> Cost:
        return Cost(**{name: getattr(self, name) + getattr(other, name) for name in Cost.model_fields})

    def times(self, n: int) -> Cost:
        return Cost(
            **{name: type(getattr(self, name))(getattr(self, name) * n) for name in Cost.model_fields}
        )


class ArmPlan(BaseModel):
    """One arm: the runs of a job that share an upstream, a method and their hyperparameters."""

    name: str
    kind: ArmKind
    upstream: str = Field(description="The model its runs start from (a built-in, a model id, a checkpoint).")
    learned: bool = Field(description="Whether it starts from learned weights (not random ones).")
    method: str
    adaptation: str | None = None
    network: Network | None = Field(default=None, description="The network its runs train, as priced.")
    seeds: list[int]
    folds: int = Field(default=0, description="Cross-validation: one run per fold and seed.")
    primary: bool = Field(
        default=False,
        description="The job's own run (its checkpoints, its result model) is this arm's first.",
    )
    hyperparameters: dict[str, Any] = Field(default_factory=dict)
    examples: Examples
    runs: int
    cost: Cost = Field(description="All the arm's runs.")

    @property
    def trains(self) -> bool:
        return self.kind not in ("as_is", "evaluation")

    @property
    def warmup_epochs(self) -> int:
        """Head warm-up epochs of each run (a head fitted on the frozen backbone before it moves)."""
        warm = warms_up(self.learned, self.method, self.hyperparameters)
        return int(self.hyperparameters.get("head_warmup_epochs") or 0) if warm else 0


class PlannedRun(BaseModel):
    """One run, as the worker makes it."""

    name: str  # also the key of its training state in the job's journal
    arm: str
    kind: ArmKind
    seed: int
    fold: int | None = None  # 0-based
    folds: int = 0
    primary: bool = False
    adaptation: str | None = None
    hyperparameters: dict[str, Any]


PlanKind = Literal["study", "adaptation", "distillation", "self_supervised", "evaluation"]


class JobPlan(BaseModel):
    """Every run a job makes, by arm, and what they cost."""

    version: Literal[1] = 1
    kind: PlanKind
    arms: list[ArmPlan]
    cost: Cost

    def arm(self, name: str) -> ArmPlan:
        return next(arm for arm in self.arms if arm.name == name)

    @property
    def primary(self) -> ArmPlan:
        return next(arm for arm in self.arms if arm.primary)

    def runs(self) -> list[PlannedRun]:
        """The runs in the order the worker makes them."""

        def run(
            arm: ArmPlan, name: str, seed: int, fold: int | None = None, primary: bool = False
        ) -> PlannedRun:
            return PlannedRun(
                name=name,
                arm=arm.name,
                kind=arm.kind,
                seed=seed,
                fold=fold,
                folds=arm.folds,
                primary=primary,
                adaptation=arm.adaptation,
                hyperparameters=arm.hyperparameters,
            )

        trained = [arm for arm in self.arms if arm.trains]
        if self.kind == "study":
            folded = [arm for arm in trained if arm.folds]
            if folded:
                everything = self.primary
                found = [run(everything, everything.name, everything.seeds[0], primary=True)]
                for seed in folded[0].seeds:
                    for k in range(folded[0].folds):
                        found += [
                            run(arm, f"{arm.name}, seed {seed}, fold {k + 1}", seed, k) for arm in folded
                        ]
                return found
            seeds = self.primary.seeds
            return [
                run(arm, f"{arm.name}, seed {seed}", seed, primary=arm.primary and i == 0)
                for i, seed in enumerate(seeds)
                for arm in trained
            ]
        if self.kind == "adaptation":
            return [
                run(arm, f"{arm.name}, seed {seed}", seed, primary=arm.primary and i == 0)
                for arm in trained
                for i, seed in enumerate(arm.seeds)
            ]
        return [run(arm, arm.name, arm.seeds[0], primary=arm.primary) for arm in trained]


def plan_cost(arms: list[ArmPlan]) -> Cost:
    total = Cost()
    for arm in arms:
        total = total + arm.cost
    return total


# ------------------------------------------------------------------------------------------------ pricing


def warms_up(learned: bool, method: str, hyperparameters: dict[str, Any]) -> bool:
    """A run fits its head on the frozen backbone before the backbone moves (workers/recipes/finetune.py,
    _warm_up_head): learned weights, a method that moves the backbone, and warm-up epochs. A kept head
    warms up too (from its source weights)."""
    return (
        learned and method in ("full", "partial", "lora") and bool(hyperparameters.get("head_warmup_epochs"))
    )


def run_cost(arm: ArmPlan, *, teacher: Network | None = None, embeds: bool = True) -> Cost:
    """One run of `arm`: its feature passes (unless `embeds` is false: the feature cache has them from an
    earlier run), head warm-up, epochs (with validation, unlabelled or target batches), its final
    measurements and, for a distilled student, the teacher's predictions."""
    hp, ex, network = arm.hyperparameters, arm.examples, arm.network
    if not arm.trains:
        forward = float(ex.embedded)
        return _priced(network, Cost(forward_examples=forward), forward=forward)
    if not embeds:
        ex = ex.model_copy(update={"embedded": 0})
    epochs = int(hp["epochs"])
    batch = max(1, int(hp["batch_size"]))
    method = arm.method
    steps_per_epoch = (
        max(1, ex.train // min(batch, max(ex.train, 1)))  # contrastive batches drop the last, smaller one
        if method == "self_supervised"
        else max(1, math.ceil(ex.train / batch))
    )
    warmup = arm.warmup_epochs
    warmup_steps = warmup * math.ceil(ex.train / batch)
    steps = epochs * steps_per_epoch + warmup_steps
    frozen = method == "linear_probe"
    # Examples through the backbone without gradients: features computed once (a linear probe's, the
    # warm-up's), validation each epoch (over cached features when frozen), the final measurements.
    forward = float(ex.embedded + (0 if frozen else epochs * ex.validation) + ex.validation + ex.evaluation)
    if arm.kind == "adaptation" and not frozen:
        # target accuracy each epoch, and label-free diagnostics at the end (over cached features when frozen)
        forward += (
            epochs * ex.evaluation
            + min(ex.train, DIAGNOSTIC_EXAMPLES)
            + min(ex.unlabeled, DIAGNOSTIC_EXAMPLES)
        )
    trained = 0.0 if frozen else float(epochs * ex.train)
    if arm.kind == "adaptation" and arm.adaptation != "source_only" and not frozen:
        trained += epochs * ex.unlabeled  # a target batch beside each source batch, through the same pass
    elif ex.unlabeled and not frozen:
        forward += epochs * ex.unlabeled  # the weak view's predictions
        trained += epochs * ex.unlabeled  # the strong view's
    if method == "self_supervised":
        trained *= 2  # two views of each example
    cost = Cost(
        optimizer_steps=steps,
        forward_examples=forward,
        training_examples=trained,
    )
    if network is None:
        return cost
    share = _trained_share(arm)
    factor = training_factor(network, "full" if method == "self_supervised" else method, share)
    seconds = network.forward_seconds(forward + trained * factor)
    flops = network.flops() * (forward + trained * 3)
    # Steps over cached features: every epoch of a frozen backbone's head (and adapter), a warm-up's head.
    heads = (epochs * (ex.train + ex.unlabeled) if frozen else 0) + warmup * ex.train
    trainable = _trainable_parameters(arm, network, share)
    seconds += network.head_seconds(heads)
    seconds += (steps - warmup_steps) * step_seconds(trainable, head_only=frozen)
    seconds += warmup_steps * step_seconds(network.head_parameters(), head_only=True)
    seconds += run_overhead_seconds(epochs, trainable)
    if teacher is not None and ex.teacher:
        seconds += teacher.forward_seconds(ex.teacher)
        flops += teacher.flops() * ex.teacher
    return cost.model_copy(update={"tflop": flops / 1e12, "seconds": seconds})


def _priced(network: Network | None, cost: Cost, *, forward: float) -> Cost:
    if network is None:
        return cost
    return cost.model_copy(
        update={"tflop": network.flops() * forward / 1e12, "seconds": network.forward_seconds(forward)}
    )


def _trained_share(arm: ArmPlan) -> float:
    if arm.method != "partial" or arm.network is None:
        return 1.0
    from graft.catalog import BUILTIN_MODELS

    blocks = max(1, BUILTIN_MODELS[arm.network.architecture].num_blocks)
    return min(1.0, int(arm.hyperparameters.get("unfreeze_blocks") or 1) / blocks)


def _trainable_parameters(arm: ArmPlan, network: Network, share: float) -> int:
    head = network.head_parameters()
    if arm.method == "linear_probe":
        return head
    if arm.method == "lora":
        return head + network.parameters() // 100
    return head + int(network.parameters() * share)


def _arm(
    name: str,
    kind: ArmKind,
    *,
    upstream: str,
    learned: bool,
    method: str,
    network: Network | None,
    seeds: list[int],
    hyperparameters: dict[str, Any],
    examples: Examples,
    folds: int = 0,
    primary: bool = False,
    adaptation: str | None = None,
    teacher: Network | None = None,
    cached: bool = False,
) -> ArmPlan:
    """An arm and its cost. A frozen backbone's features with learned weights are computed once per model
    and dataset (the feature cache): by the arm's first run, or by an earlier arm (`cached`)."""
    runs = len(seeds) * max(folds, 1) if kind not in ("as_is", "evaluation") else 1
    arm = ArmPlan(
        name=name,
        kind=kind,
        upstream=upstream,
        learned=learned,
        method=method,
        adaptation=adaptation,
        network=network,
        seeds=seeds,
        folds=folds,
        primary=primary,
        hyperparameters=hyperparameters,
        examples=examples,
        runs=runs,
        cost=Cost(),
    )
    first = run_cost(arm, teacher=teacher, embeds=not (cached and learned))
    later = run_cost(arm, teacher=teacher, embeds=not learned).times(runs - 1) if runs > 1 else Cost()
    return arm.model_copy(update={"cost": first + later})


def with_warmup_rate(hyperparameters: dict[str, Any], learned: bool, method: str) -> dict[str, Any]:
    """The arm's hyperparameters with the head warm-up's learning rate, where its runs warm a head up."""
    if warms_up(learned, method, hyperparameters):
        return {"head_warmup_learning_rate": HEAD_WARMUP_LEARNING_RATE, **hyperparameters}
    return hyperparameters


# ------------------------------------------------------------------------------------------------ kinds


class Upstream(BaseModel):
    """A model a plan's arm starts from: its id, whether its weights are learned, its architecture and, to
    price the runs, its network (None: the plan is not priced, as for a job stored before plans were)."""

    id: str
    learned: bool
    architecture: str
    network: Network | None = None


def plan_training(
    spec: TrainingSpec,
    seed: int,
    *,
    upstream: Upstream,
    train: DataFacts,
    validation: DataFacts | None = None,
    evaluation: DataFacts | None = None,
    unlabeled: DataFacts | None = None,
    scratch: Network | None = None,
    named: dict[str, Upstream] | None = None,
) -> JobPlan:
    """finetune and pretrain (supervised or self-supervised): the study of workers/recipes/study.py. The
    transferred arm, and with a baseline the scratch arm and the named arms, for each seed; with
    cross-validation folds, each of them once per fold and seed, and the job's own model on every label."""
    hp = resolved(spec.hyperparameters)
    seeds = list(spec.seeds or [seed])
    n = train.examples
    if spec.method == "self_supervised":
        arm = _arm(
            "self-supervised",
            "self_supervised",
            upstream=upstream.id,
            learned=upstream.learned,
            method="self_supervised",
            network=upstream.network,
            seeds=[seed],
            hyperparameters=hp,
            examples=Examples(train=n),
            primary=True,
        )
        return JobPlan(kind="self_supervised", arms=[arm], cost=arm.cost)
    split = float(spec.hyperparameters.validation_split)
    if validation is not None:
        train_n, validation_n = n, validation.examples
    else:
        train_n, validation_n = split_sizes(train.class_counts, split) if train.class_counts else (n, 0)
    evaluated = evaluation.examples if evaluation is not None else 0
    semi = spec.hyperparameters.unlabeled_ratio if unlabeled is not None else None

    def examples(train_examples: int, validation_examples: int, evaluation_examples: int) -> Examples:
        return Examples(
            train=train_examples,
            validation=validation_examples,
            evaluation=evaluation_examples,
            unlabeled=train_examples * int(semi or 0),
            embedded=(
                train_examples + validation_examples + (unlabeled.examples if unlabeled is not None else 0)
                if spec.method == "linear_probe"
                else 0
            )
            + (train_examples if warms_up(upstream.learned, spec.method, hp) else 0),
        )

    folds = int(spec.hyperparameters.cross_validation_folds or 0)
    cross_validated = spec.baseline and folds > 1 and validation is None and evaluation is None
    method = spec.method
    transferred_hp = with_warmup_rate(hp, upstream.learned, method)
    scratch_hp = scratch_hyperparameters(hp, upstream.architecture)
    named_arms = [name for name in spec.baseline_arms or [] if name != "scratch"] if spec.baseline else []
    arms: list[ArmPlan] = []
    if cross_validated:
        fold_hp = {**hp, "model_selection": "last", "early_stopping": None}
        held = n / folds
        fold_train, fold_held = round(n - held), round(held)
        arms.append(
            _arm(
                "transferred, all labels",
                "transferred",
                upstream=upstream.id,
                learned=upstream.learned,
                method=method,
                network=upstream.network,
                seeds=[seed],
                hyperparameters={**transferred_hp, "validation_split": 0.0},
                examples=examples(n, 0, 0),
                primary=True,
            )
        )
        fold_arms: list[tuple[str, ArmKind, Upstream, str, dict[str, Any]]] = [
            (
                "transferred",
                "transferred",
                upstream,
                method,
                with_warmup_rate(fold_hp, upstream.learned, method),
            ),
            (
                "scratch",
                "scratch",
                _scratch(upstream, scratch),
                "full",
                scratch_hyperparameters(fold_hp, upstream.architecture),
            ),
        ]
        for name in named_arms:
            if name == "as_is":
                continue
            other = (named or {})[name]
            fold_arms.append(
                (name, _named_kind(name), other, method, with_warmup_rate(fold_hp, other.learned, method))
            )
        for name, kind, source, arm_method, arm_hp in fold_arms:
            arms.append(
                _arm(
                    name,
                    kind,
                    upstream=source.id,
                    learned=source.learned,
                    method=arm_method,
                    network=source.network,
                    seeds=seeds,
                    folds=folds,
                    hyperparameters=arm_hp,
                    examples=examples(fold_train, fold_held, 0),
                )
            )
        as_is_examples = n
    else:
        arms.append(
            _arm(
                "transferred",
                "transferred",
                upstream=upstream.id,
                learned=upstream.learned,
                method=method,
                network=upstream.network,
                seeds=seeds,
                hyperparameters=transferred_hp,
                examples=examples(train_n, validation_n, evaluated),
                primary=True,
            )
        )
        if spec.baseline:
            source = _scratch(upstream, scratch)
            arms.append(
                _arm(
                    "scratch",
                    "scratch",
                    upstream=source.id,
                    learned=False,
                    method="full",
                    network=source.network,
                    seeds=seeds,
                    hyperparameters=scratch_hp,
                    examples=examples(train_n, validation_n, evaluated).model_copy(update={"embedded": 0}),
                )
            )
        for name in named_arms:
            if name == "as_is":
                continue
            other = (named or {})[name]
            arms.append(
                _arm(
                    name,
                    _named_kind(name),
                    upstream=other.id,
                    learned=other.learned,
                    method=method,
                    network=other.network,
                    seeds=seeds,
                    hyperparameters=with_warmup_rate(hp, other.learned, method),
                    examples=examples(train_n, validation_n, evaluated),
                )
            )
        as_is_examples = evaluated or validation_n
    if "as_is" in named_arms:
        arms.append(
            _arm(
                "as_is",
                "as_is",
                upstream=upstream.id,
                learned=True,
                method="predict",
                network=upstream.network,
                seeds=seeds,
                hyperparameters={},
                examples=Examples(embedded=evaluated or as_is_examples if not cross_validated else n),
            )
        )
    return JobPlan(kind="study", arms=arms, cost=plan_cost(arms))


def _named_kind(name: str) -> ArmKind:
    return "parent" if name == "parent" else "model"


def _scratch(upstream: Upstream, scratch: Network | None) -> Upstream:
    architecture = upstream.architecture
    return Upstream(
        id=f"{architecture} (random weights)", learned=False, architecture=architecture, network=scratch
    )


def plan_adaptation(
    spec: AdaptSpec,
    seed: int,
    *,
    upstream: Upstream,
    source: DataFacts,
    target: DataFacts,
    evaluation: DataFacts | None = None,
) -> JobPlan:
    """adapt: source_only and each method, for each seed (workers/recipes/adapt.py)."""
    hp = resolved(spec.hyperparameters)
    seeds = list(spec.seeds or [seed])
    train_n, validation_n = split_sizes(source.class_counts, float(spec.hyperparameters.validation_split))
    evaluated = evaluation.examples if evaluation is not None else 0
    ordered = ["source_only", *[m for m in spec.methods if m != "source_only"]]
    primary = next((m for m in spec.methods if m != "source_only"), "source_only")
    frozen = spec.method == "linear_probe"
    arms = []
    for method in ordered:
        arm_hp = with_warmup_rate(hp, upstream.learned, spec.method)
        if method == "dann":
            arm_hp = {**arm_hp, "discriminator_learning_rate": arm_hp["learning_rate"]}
        embedded = (train_n + validation_n + target.examples + evaluated) if frozen else 0
        if warms_up(upstream.learned, spec.method, hp):
            embedded += train_n
        arms.append(
            _arm(
                method,
                "adaptation",
                upstream=upstream.id,
                learned=upstream.learned,
                method=spec.method,
                adaptation=method,
                network=upstream.network,
                seeds=seeds,
                hyperparameters=arm_hp,
                examples=Examples(
                    train=train_n,
                    validation=validation_n,
                    evaluation=evaluated,
                    unlabeled=train_n if method != "source_only" else 0,
                    embedded=embedded,
                ),
                primary=method == primary,
                cached=bool(arms),  # every method reads the features the first computed
            )
        )
    return JobPlan(kind="adaptation", arms=arms, cost=plan_cost(arms))


def plan_distillation(
    spec: DistillSpec,
    seed: int,
    *,
    teacher: Network | None,
    student: Upstream,
    train: DataFacts,
    labelled: bool,
    evaluation: DataFacts | None = None,
) -> JobPlan:
    """distill: the distilled student and, when the transfer data have labels, the same student on the
    labels alone (workers/recipes/distill.py)."""
    hp = with_warmup_rate(resolved(spec.hyperparameters), student.learned, spec.method)
    if evaluation is not None or not labelled:
        train_n, validation_n = train.examples, 0
    else:
        train_n, validation_n = split_sizes(train.class_counts, float(spec.hyperparameters.validation_split))
    evaluated = evaluation.examples if evaluation is not None else validation_n
    embedded = (train_n + validation_n) if spec.method == "linear_probe" else 0
    if warms_up(student.learned, spec.method, hp):
        embedded += train_n
    examples = Examples(train=train_n, validation=validation_n, evaluation=evaluated, embedded=embedded)
    # The teacher predicts the transfer data once, and the evaluation data for the report.
    taught = examples.model_copy(update={"teacher": train.examples + evaluated})
    students: list[tuple[str, ArmKind, Examples]] = [("distilled student", "distilled", taught)]
    if labelled:
        students.append(("student alone", "student", examples))
    arms = [
        _arm(
            name,
            kind,
            upstream=student.id,
            learned=student.learned,
            method=spec.method,
            network=student.network,
            seeds=[seed],
            hyperparameters=hp,
            examples=arm_examples,
            primary=kind == "distilled",
            teacher=teacher if kind == "distilled" else None,
        )
        for name, kind, arm_examples in students
    ]
    return JobPlan(kind="distillation", arms=arms, cost=plan_cost(arms))


def plan_evaluation(spec: EvaluateSpec, *, network: Network | None, dataset: DataFacts) -> JobPlan:
    arm = _arm(
        "evaluation",
        "evaluation",
        upstream=spec.model,
        learned=True,
        method="predict",
        network=network,
        seeds=[0],
        hyperparameters={},
        examples=Examples(embedded=dataset.examples),
        primary=True,
    )
    return JobPlan(kind="evaluation", arms=[arm], cost=arm.cost)
