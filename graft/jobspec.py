"""What a job is asked to do: one typed, versioned spec per job kind.

The API's planner for a kind (`app/jobs/service.py`) checks a request and resolves its defaults into the
kind's spec; the job store writes it on the job's row (`jobs.spec`) with the listing columns drawn from it
(`columns`); the worker's handler for the kind (`workers/handlers.py`) reads it back (`parse`) and builds
the recipe's config from it. Nothing else carries a job's inputs from the API to the worker, and the
bounds of every hyperparameter are declared once, here: the request schemas (`app/jobs/schemas.py`) use
the same types, optional there, resolved here.

A spec names each input for what it is: an adapt job's labelled `source_dataset`, a distill job's
`teacher`, an evaluate job's `model` and `dataset` (the listing columns keep their older, shared names).
A change to a spec's meaning is a new `version`, with a migration for stored rows.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, field_validator

# The bounds of each hyperparameter, shared by the request schemas and the resolved specs.
Epochs = Annotated[int, Field(ge=1, le=1000)]
BatchSize = Annotated[int, Field(ge=1, le=4096)]
LearningRate = Annotated[float, Field(gt=0, le=1)]
WeightDecay = Annotated[float, Field(ge=0, le=1)]
ValidationSplit = Annotated[float, Field(ge=0, le=0.5)]
WarmupRatio = Annotated[float, Field(ge=0, lt=1)]
GradNorm = Annotated[float, Field(gt=0, le=1e6)]
Folds = Annotated[int, Field(ge=0, le=10)]
UnfreezeBlocks = Annotated[int, Field(ge=0, le=100)]
LayerLrDecay = Annotated[float, Field(gt=0, le=1)]
LoraRank = Annotated[int, Field(ge=1, le=256)]
LoraAlpha = Annotated[float, Field(gt=0, le=4096)]
LoraDropout = Annotated[float, Field(ge=0, lt=1)]
HeadWarmupEpochs = Annotated[int, Field(ge=0, le=1000)]
LossWeight = Annotated[float, Field(ge=0, le=100)]
Threshold = Annotated[float, Field(gt=0, lt=1)]
UnlabeledRatio = Annotated[int, Field(ge=1, le=16)]
Temperature = Annotated[float, Field(gt=0, le=100)]
Share = Annotated[float, Field(ge=0, le=1)]
AdapterWidth = Annotated[int, Field(ge=1, le=4096)]

BatchNormStatistics = Literal["auto", "target", "source"]
Augmentation = Literal["auto", "none", "light", "strong"]
ModelSelection = Literal["auto", "best", "last"]
TrainingMethod = Literal["full", "linear_probe", "partial", "lora"]
Backbone = Literal["frozen", "partial", "full"]
AdaptationMethod = Literal["dann", "coral", "mmd", "mcc", "pseudo_label"]
StudentArchitecture = Literal["minilm-l6", "efficientnet-lite0", "resnet-small", "cnn-small", "mlp"]


class EarlyStopping(BaseModel):
    metric: Literal["val_loss", "val_accuracy"] = "val_loss"
    patience: int = Field(default=3, ge=1, le=100, description="Epochs without improvement before stopping.")
    min_delta: float = Field(default=0.0, ge=0, le=1, description="The smallest change that counts as one.")


class Hyperparameters(BaseModel):
    """A run's training settings, resolved: what the client sent, the defaults for the rest."""

    epochs: Epochs
    batch_size: BatchSize
    learning_rate: LearningRate
    weight_decay: WeightDecay
    validation_split: ValidationSplit
    warmup_ratio: WarmupRatio
    max_grad_norm: GradNorm
    early_stopping: EarlyStopping | None = None
    unfreeze_blocks: UnfreezeBlocks | None = None
    layer_lr_decay: LayerLrDecay | None = None
    lora_rank: LoraRank | None = None
    lora_alpha: LoraAlpha | None = None
    lora_dropout: LoraDropout | None = None
    lora_target_modules: list[str] | str | None = None
    head_warmup_epochs: HeadWarmupEpochs | None = None
    freeze_batch_norm: bool | None = None
    batch_norm_statistics: BatchNormStatistics = "auto"
    augmentation: Augmentation = "auto"
    model_selection: ModelSelection = "auto"
    cross_validation_folds: Folds = 0  # read by the study (workers/recipes/study.py), not by one run
    # Resolved by a job's plan (graft/plan.py) for the runs that use it, not asked for: the rate at which a
    # head is fitted on the frozen backbone before the backbone moves.
    head_warmup_learning_rate: LearningRate | None = None


class FinetuneHyperparameters(Hyperparameters):
    # With an unlabeled_dataset (semi-supervised fine-tuning).
    unlabeled_weight: LossWeight | None = None
    confidence_threshold: Threshold | None = None
    unlabeled_ratio: UnlabeledRatio | None = None


class AdaptHyperparameters(Hyperparameters):
    adaptation_weight: LossWeight
    pseudo_label_threshold: Threshold
    mcc_temperature: Temperature
    adapter_hidden: AdapterWidth | None = None  # a frozen backbone's feature adapter
    # Resolved by the plan for its dann runs: the rate of the domain discriminator.
    discriminator_learning_rate: LearningRate | None = None


class DistillHyperparameters(Hyperparameters):
    temperature: Temperature
    alpha: Share
    adapter_hidden: AdapterWidth | None = None


class Student(BaseModel):
    architecture: StudentArchitecture = Field(
        description="A built-in architecture of the teacher's modality."
    )
    layers: int | None = Field(
        default=None,
        ge=1,
        le=6,
        description="minilm-l6: keep this many transformer layers (the bottom ones of the pretrained encoder).",
    )
    width: int | None = Field(
        default=None,
        ge=4,
        le=256,
        description="cnn-small, resnet-small: channels of the first block (32; then 2x and 4x).",
    )
    hidden: list[int] | None = Field(
        default=None, min_length=1, max_length=4, description="mlp: hidden layer sizes ([128, 128])."
    )

    @field_validator("hidden")
    @classmethod
    def _hidden_sizes(cls, value: list[int] | None) -> list[int] | None:
        if value is not None and any(not 1 <= size <= 4096 for size in value):
            raise ValueError("hidden sizes are between 1 and 4096")
        return value

    def options(self) -> dict[str, Any]:
        """The architecture's options the client chose (for the student's model spec)."""
        return self.model_dump(exclude_none=True, exclude={"architecture"})


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    version: Literal[1] = 1


class TrainingSpec(_Spec):
    """finetune (adapt an upstream to labelled downstream data) and pretrain (train an upstream)."""

    kind: Literal["finetune", "pretrain"]
    base_model: str
    from_checkpoint: str | None = None
    initialization: Literal["pretrained", "random"] | None = None
    method: Literal["full", "linear_probe", "partial", "lora", "self_supervised"]
    training_dataset: str
    validation_dataset: str | None = None
    evaluation_dataset: str | None = None
    unlabeled_dataset: str | None = None
    head: Literal["new", "keep"] | None = None
    baseline: bool = False
    baseline_arms: list[str] | None = None  # "scratch" first, then "parent", "as_is" or model ids
    seeds: list[int] | None = None
    hyperparameters: FinetuneHyperparameters

    @property
    def upstream(self) -> str:
        """The model the job starts from (beneath its checkpoint, if it starts from one)."""
        return self.base_model

    @property
    def checkpoint_base(self) -> str:
        """The model beneath the job's checkpoints (whose network they hold)."""
        return self.upstream


class AdaptSpec(_Spec):
    """Domain adaptation: labelled source data, unlabelled target data, one run per method."""

    kind: Literal["adapt"]
    base_model: str
    source_dataset: str
    target_dataset: str
    evaluation_dataset: str | None = None
    backbone: Backbone
    method: TrainingMethod  # what the backbone choice trains
    methods: list[AdaptationMethod]
    seeds: list[int] | None = None
    hyperparameters: AdaptHyperparameters

    @property
    def upstream(self) -> str:
        return self.base_model

    @property
    def checkpoint_base(self) -> str:
        """The model beneath the job's checkpoints (whose network they hold)."""
        return self.upstream


class DistillSpec(_Spec):
    """Knowledge distillation of a teacher into a student architecture."""

    kind: Literal["distill"]
    teacher: str
    student: Student
    training_dataset: str
    evaluation_dataset: str | None = None
    backbone: Backbone
    method: TrainingMethod
    hyperparameters: DistillHyperparameters

    @property
    def upstream(self) -> str:
        return self.teacher

    @property
    def checkpoint_base(self) -> str:
        """The network the job's checkpoints hold: the student's built-in architecture, not the teacher."""
        return self.student.architecture


class EvaluateSpec(_Spec):
    """A registered model measured on a labelled dataset."""

    kind: Literal["evaluate"]
    model: str
    dataset: str

    @property
    def upstream(self) -> str:
        return self.model

    @property
    def checkpoint_base(self) -> str:
        """The model beneath the job's checkpoints (whose network they hold)."""
        return self.upstream


JobSpec = Annotated[TrainingSpec | AdaptSpec | DistillSpec | EvaluateSpec, Field(discriminator="kind")]
_SPECS: TypeAdapter[Any] = TypeAdapter(JobSpec)


def parse(data: dict[str, Any]) -> TrainingSpec | AdaptSpec | DistillSpec | EvaluateSpec:
    """A stored spec, validated again (the worker's read)."""
    return _SPECS.validate_python(data)


def dump(spec: BaseModel) -> dict[str, Any]:
    """The spec as stored: its hyperparameters as resolved (no option the planner left unset), so that
    the spec read back shows the same hyperparameters as the job."""
    data = spec.model_dump(mode="json")
    hyperparameters = getattr(spec, "hyperparameters", None)
    if isinstance(hyperparameters, Hyperparameters):
        data["hyperparameters"] = resolved(hyperparameters)
    return data


def resolved(hyperparameters: Hyperparameters) -> dict[str, Any]:
    """The hyperparameters as the job shows them: what was resolved, no unset option."""
    return hyperparameters.model_dump(mode="json", exclude_unset=True)


def columns(spec: TrainingSpec | AdaptSpec | DistillSpec | EvaluateSpec) -> dict[str, Any]:
    """The job row's listing columns, drawn from its spec: what `GET /v1/jobs` shows and what the dataset
    and model guards query. `base_model` is a distill job's teacher and an evaluate job's model;
    `training_dataset` an adapt job's source; `validation_dataset` an evaluate job's dataset."""
    if isinstance(spec, EvaluateSpec):
        return {
            "type": spec.kind,
            "base_model": spec.upstream,
            "validation_dataset": spec.dataset,
            "hyperparameters": {},
        }
    common = {
        "type": spec.kind,
        "base_model": spec.upstream,
        "method": spec.method,
        "hyperparameters": resolved(spec.hyperparameters),
    }
    if isinstance(spec, AdaptSpec):
        return {
            **common,
            "training_dataset": spec.source_dataset,
            "target_dataset": spec.target_dataset,
            "evaluation_dataset": spec.evaluation_dataset,
            "methods": list(spec.methods),
            "seeds": spec.seeds,
        }
    if isinstance(spec, DistillSpec):
        return {
            **common,
            "training_dataset": spec.training_dataset,
            "evaluation_dataset": spec.evaluation_dataset,
            "student": spec.student.model_dump(exclude_none=True),
        }
    return {
        **common,
        "training_dataset": spec.training_dataset,
        "validation_dataset": spec.validation_dataset,
        "evaluation_dataset": spec.evaluation_dataset,
        "unlabeled_dataset": spec.unlabeled_dataset,
        "head": spec.head,
        "initialization": spec.initialization,
        "from_checkpoint": spec.from_checkpoint,
        "baseline": spec.baseline,
        "baseline_arms": spec.baseline_arms,
        "seeds": spec.seeds,
    }
