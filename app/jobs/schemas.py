from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from app.core.errors import UNION_TAGS
from graft.catalog import LORA_TARGET_MODULES
from graft.defaults import defaults_table
from graft.job_store import JobStatus
from graft.jobspec import (
    AdaptationMethod,
    Augmentation,
    Backbone,
    BatchNormStatistics,
    BatchSize,
    EarlyStopping,
    Epochs,
    Folds,
    GradNorm,
    HeadWarmupEpochs,
    LayerLrDecay,
    LearningRate,
    LoraAlpha,
    LoraDropout,
    LoraRank,
    LossWeight,
    ModelSelection,
    Share,
    Student,
    Temperature,
    Threshold,
    UnfreezeBlocks,
    UnlabeledRatio,
    ValidationSplit,
    WarmupRatio,
    WeightDecay,
)
from graft.plan import JobPlan
from graft.text import SafeId, SafeStr

# Request bodies are strict: a JSON string is not a number ("learning_rate": "0.1"), nor a boolean an
# integer ("epochs": true), nor "yes" a boolean. Lax parsing would turn a client's mistake into a job it
# did not mean to start. (Integers are still accepted for floats; JSON has no other way to write 1.0.)
STRICT_REQUEST = ConfigDict(extra="forbid", strict=True)


class EarlyStoppingIn(EarlyStopping):
    model_config = ConfigDict(**STRICT_REQUEST, allow_inf_nan=False)


METHOD_KEYS: dict[str, tuple[str, ...]] = {
    "partial": ("unfreeze_blocks", "layer_lr_decay", "head_warmup_epochs"),
    "full": ("layer_lr_decay", "head_warmup_epochs"),
    "lora": ("lora_rank", "lora_alpha", "lora_dropout", "lora_target_modules", "head_warmup_epochs"),
    "linear_probe": (),
    "self_supervised": (),
}


class _BudgetIn(BaseModel):
    """Every field is optional; what is left out takes the default for the base model and method."""

    model_config = ConfigDict(**STRICT_REQUEST, allow_inf_nan=False)

    epochs: Epochs | None = Field(default=None, description="Passes over the training data (at most).")
    batch_size: BatchSize | None = None
    learning_rate: LearningRate | None = Field(default=None, description="Peak learning rate (AdamW).")
    weight_decay: WeightDecay | None = None
    validation_split: ValidationSplit | None = Field(
        default=None,
        description="Share of the training data held out (stratified, seeded) when no validation_dataset is "
        "given. Default 0.1, or 0 (every label trains) when the job has an evaluation_dataset and 0.1 would "
        "hold fewer than 20 examples per class, too few to choose an epoch by, and neither model_selection, "
        "early_stopping nor baseline is given.",
    )
    warmup_ratio: WarmupRatio | None = Field(default=None, description="Share of steps of linear warm-up.")
    max_grad_norm: GradNorm | None = Field(default=None, description="Gradient clipping norm.")
    freeze_batch_norm: bool | None = Field(
        default=None,
        description="Keep every batch norm's running statistics (its scale and shift still train). Default: "
        "true when fine-tuning learned weights, false when pretraining or starting from random weights.",
    )
    batch_norm_statistics: BatchNormStatistics | None = Field(
        default=None,
        description="Learned weights with batch norms: where their statistics come from. `target`: "
        "re-estimated on the training data before training (AdaBN), `source`: the upstream's, `auto` (the "
        "default): for `full`, re-estimated when the training data's activations differ from the stored "
        "statistics (a shift score, the mean symmetric KL divergence per channel, above 0.05; the job's events "
        "give it); linear_probe, partial and lora keep the upstream's, so their frozen part computes what it did.",
    )
    augmentation: Augmentation | None = Field(
        default=None,
        description="Images, methods that train the backbone: label-safe augmentation of training batches "
        "only (resized crops, shifts, small rotations, colour jitter on colour images; never flips). `light`: "
        "crops of 80-100%, 8% shifts, 10 degrees; `strong`: 60-100%, 12%, 15 degrees and shear. `auto` (the "
        "default): `light` up to 10,000 training images trained for at least 100 steps, else `none`.",
    )
    cross_validation_folds: Folds | None = Field(
        default=None,
        description="finetune with baseline: estimate the gain by k-fold cross-validation over all the "
        "training labels (both arms train on k-1 folds and predict the held-out one; the job's model then "
        "trains on every label). 0: compare on the validation data. Default: 5 folds (fewer when a class "
        "has fewer than 5 examples) when the validation data would hold fewer than 20 examples per class "
        "and neither validation_split, a validation_dataset nor an evaluation_dataset is given; else 0.",
    )
    model_selection: ModelSelection | None = Field(
        default=None,
        description="Which epoch is the result. `best`: the best on the validation data; `last`: the end of "
        "the schedule (warm-up, cosine decay to zero). `auto` (the default): `best` when the validation data "
        "hold at least 20 examples per class or early_stopping is set, else `last`: on fewer, one example "
        "moves the score by points and choosing on it is noise.",
    )


class HyperparametersIn(_BudgetIn):
    """Every field is optional; what is left out takes the default for the base model and method."""

    unlabeled_weight: LossWeight | None = Field(
        default=None, description="With unlabeled_dataset: weight of the unlabelled loss (1.0)."
    )
    confidence_threshold: Threshold | None = Field(
        default=None,
        description="With unlabeled_dataset: the probability a prediction on the weak view needs to become a "
        "target of the strong view (0.95).",
    )
    unlabeled_ratio: UnlabeledRatio | None = Field(
        default=None,
        description="With unlabeled_dataset: unlabelled examples drawn per labelled one in each step (3).",
    )

    early_stopping: EarlyStoppingIn | None = Field(
        default=None,
        description="Stop when the metric has not improved for `patience` epochs (needs validation data).",
    )
    unfreeze_blocks: UnfreezeBlocks | None = Field(
        default=None, description="partial: top blocks that train."
    )
    layer_lr_decay: LayerLrDecay | None = Field(
        default=None,
        description="partial, full: the k-th block from the top trains at lr * decay^k.",
    )
    lora_rank: LoraRank | None = Field(default=None, description="lora: adapter rank.")
    lora_alpha: LoraAlpha | None = Field(default=None, description="lora: scaling numerator.")
    lora_dropout: LoraDropout | None = Field(default=None, description="lora: dropout on the adapter input.")
    head_warmup_epochs: HeadWarmupEpochs | None = Field(
        default=None,
        description="full, partial, lora: epochs fitting a new head on the frozen backbone's features first "
        "(0: none).",
    )
    lora_target_modules: list[SafeStr] | None = Field(
        default=None,
        min_length=1,
        max_length=32,
        description="lora: the modules to adapt (peft matches each name against the end of a module's "
        "qualified name). Left out: the backbone's own choice. Names per base architecture: "
        + "; ".join(f"{arch}: {', '.join(names)}" for arch, names in LORA_TARGET_MODULES.items())
        + ".",
    )

    @field_validator("lora_target_modules")
    @classmethod
    def _distinct_targets(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and len(set(value)) != len(value):
            raise ValueError("module names must be distinct")
        return value


class _JobRequest(BaseModel):
    """What every job request has: a seed and the client's metadata."""

    model_config = ConfigDict(**STRICT_REQUEST)

    seed: int | None = Field(default=None, ge=0, le=2**32 - 1, description="Random when left out; recorded.")
    metadata: dict[SafeStr, SafeStr] | None = Field(
        default=None, description="Up to 16 string pairs for your bookkeeping."
    )

    @field_validator("metadata")
    @classmethod
    def _small_metadata(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        if value is None:
            return value
        if len(value) > 16:
            raise ValueError("at most 16 keys")
        for key, item in value.items():
            if len(key) > 64 or len(item) > 512:
                raise ValueError("keys are at most 64 characters and values at most 512")
        return value

    @field_validator("seeds", check_fields=False)
    @classmethod
    def _distinct_seeds(cls, value: list[int] | None) -> list[int] | None:
        if value is not None:
            if len(set(value)) != len(value):
                raise ValueError("seeds must be distinct")
            if any(not 0 <= seed < 2**32 for seed in value):
                raise ValueError("seeds are between 0 and 2^32 - 1")
        return value


class TrainingJobCreate(_JobRequest):
    """A finetune or pretrain job."""

    model_config = ConfigDict(
        **STRICT_REQUEST,
        json_schema_extra={
            "examples": [
                {
                    "type": "finetune",
                    "base_model": "minilm-l6",
                    "training_dataset": "ds_mb2kqv7gq3zd5w4bn6e2c3x1",
                    "method": "linear_probe",
                    "hyperparameters": {"epochs": 20},
                    "seed": 42,
                    "metadata": {"experiment": "baseline"},
                },
                {
                    "type": "finetune",
                    "base_model": "mdl_q2c7x5m8n4b6v1z3k9j0h2g4",
                    "training_dataset": "ds_mb2kqv7gq3zd5w4bn6e2c3x1",
                    "method": "partial",
                    "baseline": True,
                    "seeds": [1, 2, 3],
                    "hyperparameters": {
                        "unfreeze_blocks": 1,
                        "early_stopping": {"metric": "val_accuracy", "patience": 3},
                    },
                },
                {
                    "type": "pretrain",
                    "base_model": "cnn-small",
                    "training_dataset": "ds_4k7q2m9x5c3v8b1n6z0w2e4r",
                },
            ]
        },
    )

    type: Literal["finetune", "pretrain"] = Field(
        description="finetune: adapt an upstream model to a labelled downstream dataset. pretrain: train an "
        "upstream model on a labelled source dataset (from scratch, or continuing from a base model); it is "
        "registered as a pretrained model for later jobs. With method self_supervised, pretraining needs no "
        "labels."
    )
    base_model: SafeStr | None = Field(
        default=None,
        min_length=1,
        max_length=64,
        description="A built-in model id or a project's mdl_ id. May be left out with from_checkpoint.",
    )
    training_dataset: SafeStr = Field(min_length=1, max_length=64)
    validation_dataset: SafeStr | None = Field(
        default=None,
        max_length=64,
        description="Labelled data to validate on each epoch (and to choose the epoch by; see model_selection) "
        "instead of a split of the training data.",
    )
    evaluation_dataset: SafeStr | None = Field(
        default=None,
        max_length=64,
        description="finetune: labelled data never trained on nor chosen by. The result model is measured on "
        "it (metrics eval_accuracy, eval_macro_f1), and with baseline the report compares the arms on it.",
    )
    unlabeled_dataset: SafeStr | None = Field(
        default=None,
        max_length=64,
        description="finetune: unlabelled examples of the same domain (labels, if any, are never read). "
        "Semi-supervised fine-tuning: beside every labelled batch, confident predictions on a weak view of "
        "unlabelled examples teach a strong view of them (FixMatch: light against strong augmentation and "
        "cutout for images; no dropout against dropout for text and tables; features against noisy features "
        "for a linear probe). With baseline, every arm trains with them.",
    )
    method: Literal["full", "linear_probe", "partial", "lora", "self_supervised"] = Field(
        default="full",
        description="full: every weight trains. linear_probe: the backbone is frozen and a new head trains on its "
        "features (computed once per example, cached across jobs). partial: the top `unfreeze_blocks` blocks "
        "and the head train, with layer-wise learning rates. lora: low-rank adapters on the backbone and the "
        "head train; the adapter is kept on its own and merged into the served model. self_supervised (pretrain "
        "only): continue pretraining on an unlabelled dataset: contrastive views for images (SimCLR) and text "
        "(SimCSE, minilm-l6), a denoising autoencoder for tables (mlp); the result is a backbone with no head.",
    )
    hyperparameters: HyperparametersIn = Field(default_factory=HyperparametersIn)
    head: Literal["new", "keep"] | None = Field(
        default=None,
        description="Left out: the head is kept when the dataset's label set is the base model's (domain "
        "transfer) and replaced otherwise (task transfer). Classes are matched by name.",
    )
    baseline: bool | list[SafeId] = Field(
        default=False,
        description="Also train the same architecture from scratch on the same data and budget, and write the "
        "transfer report (GET /v1/jobs/{id}/report). A list names more arms to compare with, each on the same "
        'held-out examples with its own negative-transfer flag: "scratch" (always run: the report\'s '
        'reference), "parent" (the base model\'s own upstream fine-tuned the same way: did your '
        'intermediate pretraining help?), "as_is" (the upstream with no fine-tuning, where its classes are '
        "the dataset's) or a model id (another upstream fine-tuned the same way). At most 4.",
    )
    seeds: list[int] | None = Field(
        default=None, min_length=1, max_length=5, description="With baseline: repeat both runs for each seed."
    )
    from_checkpoint: SafeStr | None = Field(
        default=None, max_length=64, description="Start from another job's checkpoint (a ckpt_ id)."
    )
    initialization: Literal["pretrained", "random"] | None = Field(
        default=None,
        description="pretrain only: start from the base model's weights, or train its architecture from scratch. "
        "Default: pretrained when the base model has weights.",
    )


class AdaptHyperparametersIn(_BudgetIn):
    """Every field is optional: defaults are those of the method the backbone means (the table above); with
    a frozen backbone the adapter and head train at a learning rate of 1e-3."""

    adaptation_weight: LossWeight | None = Field(
        default=None, description="Weight of the adaptation loss beside the source loss (1.0)."
    )
    pseudo_label_threshold: Threshold | None = Field(
        default=None,
        description="pseudo_label: the confidence a target prediction needs to be trained on (0.9).",
    )
    mcc_temperature: Temperature | None = Field(
        default=None, description="mcc: softmax temperature of the class confusion (2.5)."
    )


def _default_methods() -> list[AdaptationMethod]:
    return ["mmd"]


class AdaptJobCreate(_JobRequest):
    """Domain adaptation (transductive transfer): labelled source data, unlabelled target data."""

    model_config = ConfigDict(
        **STRICT_REQUEST,
        json_schema_extra={
            "examples": [
                {
                    "type": "adapt",
                    "base_model": "efficientnet-lite0",
                    "source_dataset": "ds_4k7q2m9x5c3v8b1n6z0w2e4r",
                    "target_dataset": "ds_9z3m5n6p8r1t0v2w4b2k7xq4",
                    "evaluation_dataset": "ds_8n1k6z0w2e4r7x2m4q9c5v3b",
                    "methods": ["dann", "coral"],
                    "seeds": [1, 2, 3],
                }
            ]
        },
    )

    type: Literal["adapt"] = Field(
        description="adapt: train on a labelled source dataset while aligning the model with an unlabelled "
        "target dataset, one run per method beside source_only (the reference: source training alone)."
    )
    base_model: SafeStr = Field(
        min_length=1, max_length=64, description="A built-in id or a project's mdl_ id."
    )
    source_dataset: SafeStr = Field(min_length=1, max_length=64, description="Labelled source data.")
    target_dataset: SafeStr = Field(
        min_length=1,
        max_length=64,
        description="Target data; only its inputs are read for training (labels, if any, are ignored).",
    )
    evaluation_dataset: SafeStr | None = Field(
        default=None,
        max_length=64,
        description="Labelled target-domain data to measure target accuracy and macro-F1 on (never trained on).",
    )
    methods: list[AdaptationMethod] = Field(
        default_factory=_default_methods,
        min_length=1,
        max_length=5,
        description="dann: a domain discriminator through gradient reversal. coral: align feature covariances. "
        "mmd: multi-kernel maximum mean discrepancy. mcc: minimum class confusion on target predictions. "
        "pseudo_label: self-training on confident target predictions. source_only always runs beside them; the "
        "first method's model (first seed) is the job's result.",
    )
    seeds: list[int] | None = Field(
        default=None,
        min_length=1,
        max_length=5,
        description="Repeat every method per seed (adversarial "
        "training is unstable: the report shows the spread).",
    )
    backbone: Backbone | None = Field(
        default=None,
        description="What trains. frozen: the backbone's features come once from the feature cache and a "
        "residual feature adapter (each domain's features standardised with its own statistics) and the head "
        "train over them: seconds on a CPU where a full pass of a transformer takes minutes. partial: the top "
        "blocks train too. full: the whole network. Default: frozen for the built-ins with package weights "
        "(minilm-l6, efficientnet-lite0) and models made from them, full for the small networks "
        "(resnet-small, cnn-small, mlp).",
    )
    hyperparameters: AdaptHyperparametersIn = Field(default_factory=AdaptHyperparametersIn)

    @field_validator("methods")
    @classmethod
    def _distinct_methods(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError("methods must be distinct")
        return value


class DistillHyperparametersIn(_BudgetIn):
    """Every field is optional: defaults are the student architecture's `full` ones (the table above)."""

    temperature: Temperature | None = Field(
        default=None, description="Softens teacher and student outputs in the KL term (4.0)."
    )
    alpha: Share | None = Field(
        default=None,
        description="Weight of cross-entropy on the labels; 1 - alpha weighs T^2 * KL to the teacher (0.5). "
        "Unlabelled transfer data train on the teacher alone.",
    )


class StudentIn(Student):
    model_config = ConfigDict(**STRICT_REQUEST)


class DistillJobCreate(_JobRequest):
    """Knowledge distillation: a smaller student learns to imitate a teacher."""

    model_config = ConfigDict(
        **STRICT_REQUEST,
        json_schema_extra={
            "examples": [
                {
                    "type": "distill",
                    "teacher": "mdl_q2c7x5m8n4b6v1z3k9j0h2g4",
                    "student": {"architecture": "minilm-l6", "layers": 2},
                    "training_dataset": "ds_mb2kqv7gq3zd5w4bn6e2c3x1",
                    "evaluation_dataset": "ds_8n1k6z0w2e4r7x2m4q9c5v3b",
                    "hyperparameters": {"temperature": 4.0, "alpha": 0.5},
                }
            ]
        },
    )

    type: Literal["distill"] = Field(
        description="distill: train a smaller student on the teacher's softened outputs (and the labels, where "
        "the transfer data have them); a student of the same size trained from scratch is the reference."
    )
    teacher: SafeStr = Field(
        min_length=1, max_length=64, description="A project's mdl_ id with a classification head."
    )
    student: StudentIn
    training_dataset: SafeStr = Field(
        min_length=1, max_length=64, description="Transfer data, labelled or not (the teacher labels it)."
    )
    evaluation_dataset: SafeStr | None = Field(
        default=None,
        max_length=64,
        description="Labelled data to compare teacher and students on. Default: a held-out share of labelled "
        "transfer data.",
    )
    backbone: Backbone | None = Field(
        default=None,
        description="What of the student trains. frozen: its pretrained backbone's features come from the "
        "feature cache and a residual feature adapter and the head learn the teacher's outputs over them "
        "(students with package weights: minilm-l6, efficientnet-lite0). partial: its top blocks too. full "
        "(default): the whole student.",
    )
    hyperparameters: DistillHyperparametersIn = Field(default_factory=DistillHyperparametersIn)


UNION_TAGS.update({"finetune", "pretrain", "adapt", "distill"})
JobCreate = Annotated[TrainingJobCreate | AdaptJobCreate | DistillJobCreate, Field(discriminator="type")]
JOB_CREATE_DESCRIPTION = (
    "Create a job: `finetune` or `pretrain` (inductive transfer), `adapt` (domain adaptation to unlabelled "
    "target data) or `distill` (knowledge distillation into a smaller student). The `type` field selects the "
    'request schema. Values are strict JSON types: `"3"` is not a number, nor `true` an integer.\n\n'
    "A job's training is bounded: its epoch passes (epochs times seeds times the runs it makes, plus head "
    "warm-up epochs) and its optimiser steps (epoch passes times batches per epoch). A job above either is "
    "refused with 422 `budget_exceeded`, the computed budget in the message and the field that drives it in "
    "`param`.\n\nDefault hyperparameters:\n\n" + defaults_table()
)


class Progress(BaseModel):
    epoch: int
    epochs: int
    step: int
    total_steps: int


class JobError(BaseModel):
    code: str
    message: str


class JobSummary(BaseModel):
    """A job as the job list shows it: everything but the plan of its runs (GET /v1/jobs/{id} has it)."""

    model_config = ConfigDict(
        from_attributes=True,
        json_schema_extra={
            "examples": [
                {
                    "object": "job",
                    "id": "job_k3m9x2c7v5b1n8z4q6w0e2r4",
                    "project_id": "proj_2b4k7xq9z3m5n6p8r1t0v2w4",
                    "type": "finetune",
                    "status": "running",
                    "base_model": "minilm-l6",
                    "training_dataset": "ds_mb2kqv7gq3zd5w4bn6e2c3x1",
                    "validation_dataset": None,
                    "method": "linear_probe",
                    "hyperparameters": {
                        "epochs": 30,
                        "batch_size": 32,
                        "learning_rate": 0.01,
                        "weight_decay": 0.01,
                        "validation_split": 0.1,
                        "warmup_ratio": 0.06,
                        "max_grad_norm": 1.0,
                    },
                    "head": None,
                    "initialization": None,
                    "from_checkpoint": None,
                    "baseline": False,
                    "seeds": None,
                    "transfer": {"kind": "task", "head": "new"},
                    "best_checkpoint": "ckpt_7x2m4q9c5v3b8n1k6z0w2e4r",
                    "report_url": None,
                    "seed": 42,
                    "metadata": {"experiment": "baseline"},
                    "progress": {"epoch": 12, "epochs": 30, "step": 456, "total_steps": 1140},
                    "metrics": {
                        "epoch": 11,
                        "train_loss": 0.31,
                        "train_accuracy": 0.9,
                        "val_loss": 0.35,
                        "val_accuracy": 0.88,
                    },
                    "error": None,
                    "result_model": None,
                    "cancel_requested": False,
                    "created_at": "2026-11-27T10:00:00Z",
                    "started_at": "2026-11-27T10:00:02Z",
                    "finished_at": None,
                }
            ]
        },
    )

    object: Literal["job"] = "job"
    id: str
    project_id: str
    type: Literal["finetune", "pretrain", "adapt", "distill", "evaluate"]
    status: JobStatus
    base_model: str = Field(description="The upstream model; for distill jobs, the teacher.")
    training_dataset: str | None = Field(description="For adapt jobs, the labelled source dataset.")
    validation_dataset: str | None
    target_dataset: str | None = Field(default=None, description="adapt: the unlabelled target dataset.")
    evaluation_dataset: str | None = Field(
        default=None, description="finetune, adapt, distill: the labelled dataset the report measures on."
    )
    unlabeled_dataset: str | None = Field(
        default=None, description="finetune: the unlabelled data of semi-supervised fine-tuning."
    )
    methods: list[str] | None = Field(default=None, description="adapt: the adaptation methods.")
    student: dict[str, Any] | None = Field(default=None, description="distill: the student architecture.")
    method: str | None
    hyperparameters: dict[str, Any] = Field(description="As resolved: what you sent, defaults for the rest.")
    head: str | None
    initialization: str | None
    from_checkpoint: str | None
    baseline: bool
    baseline_arms: list[str] | None = Field(
        default=None, description="With baseline: the report's arms beside the transferred model."
    )
    seeds: list[int] | None
    transfer: dict[str, Any] | None = Field(
        description="kind: task (new label set, new head) or domain (same label set, head kept); what the worker "
        "found once it started."
    )
    best_checkpoint: str | None = Field(
        description="The checkpoint of the best epoch so far; the result model's."
    )
    report_url: str | None = Field(
        default=None, description="Where the transfer report is, once there is one."
    )
    seed: int
    metadata: dict[str, str] | None = Field(validation_alias="user_metadata")
    progress: Progress | None
    metrics: dict[str, Any] | None = Field(
        description="While training: the latest epoch's train_loss, train_accuracy, val_loss, val_accuracy. Once "
        "succeeded: the best epoch's (the result model's). Evaluation jobs: the evaluation."
    )
    error: JobError | None
    result_model: str | None
    cancel_requested: bool
    attempts: int = Field(
        description="How many times a worker started this job: more than 1 after a worker died or shut down "
        "and the job resumed from its saved training state on another."
    )
    worker_losses: int = Field(
        description="Workers this job lost (killed, vanished: their lease expired). At GRAFT_MAX_ATTEMPTS the job "
        "fails with `worker_lost`; a worker shutting down gracefully does not count."
    )
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None


class JobOut(JobSummary):
    plan: JobPlan | None = Field(
        default=None,
        description="Every run the job makes, by arm (the transferred model, the scratch baseline, each "
        "adaptation method, the distilled student...): the model each starts from, its method, seeds and "
        "folds, every hyperparameter its runs train with (the scratch arm's own learning rate, the head "
        "warm-up's), the examples each run touches, and the estimated cost (`cost.seconds`: on the reference "
        "machine, 2 CPU cores). The worker runs exactly these runs. None for jobs made before plans were.",
    )


class JobEventOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    object: Literal["job.event"] = "job.event"
    id: str
    type: Literal["message", "metrics"]
    level: Literal["info", "warning", "error"]
    message: str
    data: dict[str, Any] | None
    created_at: datetime


class CheckpointOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    object: Literal["checkpoint"] = "checkpoint"
    id: str
    job_id: str
    epoch: int
    step: int
    metrics: dict[str, Any]
    best: bool = Field(
        default=False, description="The best epoch so far (the one the result model comes from)."
    )
    bytes: int
    sha256: str
    created_at: datetime


class Stat(BaseModel):
    mean: float | None
    std: float = Field(description="Sample standard deviation over seeds (0 with one seed).")
    values: list[float] = Field(description="One value per seed.")


class ArmSummary(BaseModel):
    val_accuracy: Stat
    val_macro_f1: Stat
    val_loss: Stat
    train_accuracy: Stat
    train_val_gap: Stat = Field(description="Training minus validation accuracy: how much it overfits.")
    best_epoch: list[int]
    epochs_run: list[int]


class Convergence(BaseModel):
    per_seed: list[dict[str, Any]] = Field(
        description="The scratch model's best validation accuracy, the epoch it reached it, and the epoch the "
        "transferred model first reached it (null: never)."
    )
    speedup: float | None = Field(
        description="Scratch epochs to its best over transferred epochs to the same."
    )


class HeldOutComparison(BaseModel):
    examples: int
    transferred_accuracy: float
    scratch_accuracy: float
    gain: float = Field(description="Mean over examples of the per-example difference (averaged over seeds).")
    standard_error: float | None
    interval_95: list[float] | None = Field(description="[low, high] of the gain; null with one example.")
    conclusive: bool = Field(description="The interval excludes zero; false: too few examples to tell.")


class ArmComparison(BaseModel):
    kind: Literal["parent", "as_is", "model"]
    base_model: str = Field(description="The arm's upstream (a built-in id or an mdl_ id).")
    accuracy: float = Field(description="The arm's accuracy on the examples compared, mean over seeds.")
    transferred_accuracy: float
    held_out: HeldOutComparison = Field(description="Transferred minus this arm, paired per example.")
    negative_transfer: bool = Field(
        description="This arm is better than the transferred model: the whole 95% interval of the gain below "
        "zero."
    )
    summary: str


class TransferReport(BaseModel):
    """finetune jobs with baseline: transferred against from scratch."""

    object: Literal["job.report"] = "job.report"
    kind: Literal["transfer"] = "transfer"
    job_id: str
    metric: str
    seeds: list[int]
    validation_examples: int
    budget: dict[str, Any] = Field(description="Epochs, batch size, and each arm's method and learning rate.")
    transferred: ArmSummary
    scratch: ArmSummary
    gain: dict[str, Stat] = Field(
        description="Transferred minus scratch per seed (for val_loss: scratch minus transferred; positive is better)."
    )
    spread: float = Field(
        description="The noise level: the spread of the gain over seeds, never below the sampling error of the "
        "validation accuracy."
    )
    negative_transfer: bool = Field(
        description="The transferred model is worse than scratch: the whole 95% interval of the held-out gain "
        "below zero (measured on validation data only: worse by more than the spread)."
    )
    measured_on: dict[str, Any] | None = Field(
        default=None,
        description="What the comparison was measured on: kind `evaluation_dataset` (dataset, examples), "
        "`cross_validation` (folds, examples: every training label, each predicted by models that never "
        "trained on it) or `validation` (examples). Null for reports written before it was recorded.",
    )
    held_out: HeldOutComparison | None = Field(
        default=None,
        description="The paired comparison on held-out examples (evaluation dataset or cross-validation).",
    )
    arms: dict[str, ArmComparison] | None = Field(
        default=None,
        description="The arms the job named beside scratch (parent, as_is, model ids), each against the "
        "transferred model on the same examples.",
    )
    convergence: Convergence
    per_class: dict[str, dict[str, float | None]] = Field(
        description="Validation accuracy (recall) per class, both arms."
    )
    confusion_matrix: dict[str, Any] = Field(
        description="labels; rows are true classes, columns predictions; summed over seeds."
    )
    learning_curves: dict[str, list[list[dict[str, float]]]] = Field(
        description="Per arm, per seed, per epoch."
    )
    summary: str


class AdaptationMethodSummary(BaseModel):
    source_val_accuracy: Stat = Field(description="On held-out source data.")
    target_accuracy: Stat | None = Field(description="On the evaluation dataset (null without one).")
    target_macro_f1: Stat | None
    prediction_entropy: Stat = Field(
        description="Mean entropy of target predictions (nats); no labels needed."
    )
    class_balance: dict[str, float] = Field(description="Share of target examples predicted as each class.")
    a_distance: Stat = Field(
        description="Proxy A-distance between source and target features (0: indistinguishable, 2: separable)."
    )
    mmd: Stat = Field(description="Maximum mean discrepancy between source and target features.")
    learning_curves: list[list[dict[str, float]]] = Field(description="Per seed, per epoch.")


class AdaptationReport(BaseModel):
    """adapt jobs: every method on the target beside source_only."""

    object: Literal["job.report"] = "job.report"
    kind: Literal["adaptation"]
    job_id: str
    seeds: list[int]
    evaluation_labels: bool = Field(description="Whether target accuracy was measured (evaluation_dataset).")
    methods: dict[str, AdaptationMethodSummary] = Field(description="source_only first.")
    gain_over_source_only: dict[str, Stat] | None = Field(
        description="Target accuracy minus source_only's, per seed (null without evaluation labels)."
    )
    best_method: str | None = Field(
        description="Highest mean target accuracy (null without evaluation labels)."
    )
    evaluation_examples: int
    helped: list[str] | None = Field(
        description="Methods whose gain exceeds the noise: the seed spread, and never less than the sampling "
        "error of the difference on this many evaluation examples."
    )
    summary: str


class DistillationArm(BaseModel):
    accuracy: float | None
    macro_f1: float | None
    agreement_with_teacher: float | None = Field(description="Share of predictions equal to the teacher's.")
    num_parameters: int
    checkpoint_bytes: int
    cpu_latency_ms: float = Field(description="Median CPU time of one batch of 32, in milliseconds.")


class DistillationReport(BaseModel):
    """distill jobs: teacher, the student trained alone and the distilled student."""

    object: Literal["job.report"] = "job.report"
    kind: Literal["distillation"]
    job_id: str
    evaluation_examples: int
    teacher: DistillationArm
    scratch_student: DistillationArm | None = Field(
        description="The same student trained on the labels alone (null when the transfer data have none)."
    )
    distilled_student: DistillationArm
    gap_recovered: float | None = Field(
        description="(distilled - scratch) / (teacher - scratch) accuracy: the share of the teacher-student gap "
        "that distillation closed."
    )
    compression: dict[str, float] = Field(description="Teacher over student: parameters, bytes, latency.")
    hyperparameters: dict[str, Any]
    learning_curves: dict[str, list[dict[str, float]]] = Field(description="Per student arm, per epoch.")
    summary: str


JobReport = Annotated[TransferReport | AdaptationReport | DistillationReport, Field(discriminator="kind")]
