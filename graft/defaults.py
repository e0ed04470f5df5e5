"""Per-backbone, per-method default hyperparameters (no torch import: the API documents and resolves
them). A job that names none of them should still give a good result."""

from __future__ import annotations

import math
from typing import Any

from graft.catalog import BUILTIN_MODELS

COMMON_DEFAULTS: dict[str, Any] = {
    "weight_decay": 0.01,
    "validation_split": 0.1,
    "warmup_ratio": 0.06,
    "max_grad_norm": 1.0,
    "early_stopping": None,
    "batch_norm_statistics": "auto",
    "augmentation": "auto",
    "model_selection": "auto",
}

# (architecture, method) -> epochs, batch_size, learning_rate
METHOD_DEFAULTS: dict[tuple[str, str], dict[str, Any]] = {
    ("minilm-l6", "linear_probe"): {"epochs": 30, "batch_size": 32, "learning_rate": 1e-2},
    ("minilm-l6", "full"): {"epochs": 4, "batch_size": 16, "learning_rate": 5e-5},
    ("minilm-l6", "partial"): {"epochs": 6, "batch_size": 16, "learning_rate": 2e-4},
    ("minilm-l6", "lora"): {"epochs": 6, "batch_size": 16, "learning_rate": 1e-3},
    ("efficientnet-lite0", "linear_probe"): {"epochs": 30, "batch_size": 32, "learning_rate": 1e-2},
    ("efficientnet-lite0", "full"): {"epochs": 8, "batch_size": 32, "learning_rate": 1e-4},
    ("efficientnet-lite0", "partial"): {"epochs": 10, "batch_size": 32, "learning_rate": 1e-3},
    ("efficientnet-lite0", "lora"): {"epochs": 10, "batch_size": 32, "learning_rate": 2e-3},
    ("cnn-small", "linear_probe"): {"epochs": 30, "batch_size": 32, "learning_rate": 1e-2},
    ("cnn-small", "full"): {"epochs": 15, "batch_size": 32, "learning_rate": 2e-3},
    ("cnn-small", "partial"): {"epochs": 15, "batch_size": 32, "learning_rate": 2e-3},
    ("cnn-small", "lora"): {"epochs": 15, "batch_size": 32, "learning_rate": 3e-3},
    ("resnet-small", "linear_probe"): {"epochs": 30, "batch_size": 32, "learning_rate": 1e-2},
    ("resnet-small", "full"): {"epochs": 30, "batch_size": 32, "learning_rate": 2e-3},
    ("resnet-small", "partial"): {"epochs": 30, "batch_size": 32, "learning_rate": 1e-3},
    ("resnet-small", "lora"): {"epochs": 30, "batch_size": 32, "learning_rate": 2e-3},
    ("mlp", "linear_probe"): {"epochs": 30, "batch_size": 32, "learning_rate": 1e-2},
    ("mlp", "full"): {"epochs": 30, "batch_size": 32, "learning_rate": 2e-3},
    ("mlp", "partial"): {"epochs": 30, "batch_size": 32, "learning_rate": 2e-3},
    # Self-supervised pretraining (pretrain jobs on unlabelled data).
    ("minilm-l6", "self_supervised"): {"epochs": 1, "batch_size": 32, "learning_rate": 3e-5},
    ("efficientnet-lite0", "self_supervised"): {"epochs": 5, "batch_size": 32, "learning_rate": 1e-4},
    ("cnn-small", "self_supervised"): {"epochs": 20, "batch_size": 64, "learning_rate": 1e-3},
    ("resnet-small", "self_supervised"): {"epochs": 20, "batch_size": 64, "learning_rate": 1e-3},
    ("mlp", "self_supervised"): {"epochs": 50, "batch_size": 64, "learning_rate": 1e-3},
}

# The `full` rows of architectures without built-in weights are for training from scratch; fine-tuning
# learned weights of them (a model pretrained by a Graft job) moves at this fraction of that rate.
# Measured (bench/quality.py, two seeds, four image cases, the head fitted first): resnet-small fine-tunes
# best at its from-scratch rate (handwritten digits 0.941 at 1x, 0.932 at 0.5x, 0.923 at 0.25x; inverted
# 0.924 / 0.909 / 0.877; noisy 0.885 / 0.822 / 0.780; colour glyphs 0.837 / 0.728 / 0.658): its upstream
# is itself small and specialised, and what the target needs is adaptation. cnn-small keeps a quarter:
# the rate that made its kept head diverge (2e-3) was the full one.
LEARNED_FULL_LR_FACTOR: dict[str, float] = {"resnet-small": 1.0, "cnn-small": 0.25, "mlp": 0.25}

# adapt and distill jobs: `backbone` "frozen" trains a feature adapter of this hidden width and the head over
# the cached features (width 64 reached 0.728 with pseudo_label where 256 reached 0.788, same case as above).
ADAPTER_HIDDEN = 256
# An adapt job's adapter and head over frozen features train at this rate, not the linear probe's 1e-2: a
# residual MLP moves further per step than a linear head, and on the suite's text shift (bench.quality,
# films -> products, MiniLM, mmd, three seeds) target accuracy went 0.761 at 1e-2, 0.769 at 3e-3, 0.778 at
# 2e-3, 0.779 at 1e-3, 0.766 at 5e-4, 0.758 at 3e-4; source-only 0.688 at 1e-2, 0.749 at 1e-3.
ADAPT_FROZEN_LEARNING_RATE = 1e-3
# The backbone an adapt job trains by default: frozen for the built-ins with package weights (a full pass of
# MiniLM over 1,000 texts costs minutes per epoch on a CPU, and its frozen features with an adapter beat
# its source-only training on the suite's text shift), fully for the small networks (seconds per epoch).
BACKBONE_CHOICES = ("frozen", "partial", "full")
BACKBONE_METHOD = {"frozen": "linear_probe", "partial": "partial", "full": "full"}


def default_backbone(architecture: str) -> str:
    return "frozen" if BUILTIN_MODELS[architecture].pretrained else "full"


LORA_DEFAULTS: dict[str, Any] = {
    "lora_rank": 8,
    "lora_alpha": 16,
    "lora_dropout": 0.1,
    "lora_target_modules": None,
}


# Methods that move the backbone first fit a new head on its frozen features for this many epochs, at this
# rate (a linear probe's: the head alone trains).
HEAD_WARMUP_EPOCHS = 10
HEAD_WARMUP_LEARNING_RATE = 1e-2
# Small datasets get more epochs (up to 4x the default), so that training takes at least this many steps.
# 100 left every small image case under-trained (bench/quality.py: resnet-small from scratch on 80 colour
# glyphs 0.39 at 100 steps, 0.74 at 400; on 100 noisy digits 0.83 and 0.88).
MIN_STEPS = 400
MAX_EPOCHS_FACTOR = 4


def method_defaults(architecture: str, method: str) -> dict[str, Any]:
    """Knobs that only some methods have: partial's unfrozen blocks and layer-wise learning-rate decay,
    LoRA's rank, alpha, dropout and target modules (None: the backbone's own choice), and the head
    warm-up of the methods that move the backbone."""
    if method == "partial":
        return {
            "unfreeze_blocks": BUILTIN_MODELS[architecture].default_unfreeze_blocks,
            "layer_lr_decay": 0.8,
            "head_warmup_epochs": HEAD_WARMUP_EPOCHS,
        }
    if method == "full":
        return {"layer_lr_decay": 1.0, "head_warmup_epochs": HEAD_WARMUP_EPOCHS}
    if method == "lora":
        return {**LORA_DEFAULTS, "head_warmup_epochs": HEAD_WARMUP_EPOCHS}
    if method == "self_supervised":
        return {"validation_split": 0.0}  # no labels: nothing to validate against
    return {}


def default_hyperparameters(architecture: str, method: str, *, learned: bool = False) -> dict[str, Any]:
    """The defaults of a job on `architecture` with `method`; `learned`: its weights are learned ones (a
    pretrained built-in, a registered model, a checkpoint), not random."""
    values = {
        **COMMON_DEFAULTS,
        **METHOD_DEFAULTS[(architecture, method)],
        **method_defaults(architecture, method),
    }
    if learned and method == "full" and not BUILTIN_MODELS[architecture].pretrained:
        values["learning_rate"] = values["learning_rate"] * LEARNED_FULL_LR_FACTOR[architecture]
    return values


# A validation set holding fewer examples per class than this is too small to choose an epoch by or to
# measure a gain on (one example moves accuracy by points); the recipe and the report share it.
MIN_VALIDATION_PER_CLASS = 20
MAX_FOLDS = 5


def validation_count(class_size: int, validation_split: float) -> int:
    """How many examples of a class of `class_size` the seeded split holds out for validation (the split
    itself is ml.data.stratified_split, which asks this): the share rounded, at least one from a class of
    4 or more, never a whole class; classes under 2 stay in training."""
    if validation_split <= 0 or class_size < 2:
        return 0
    held = round(class_size * validation_split)
    return min(max(held, 1 if class_size >= 4 else 0), class_size - 1)


def split_sizes(class_counts: dict[str, int], validation_split: float) -> tuple[int, int]:
    """(training, validation) examples of the seeded split of a dataset with these class counts."""
    validation = sum(validation_count(count, validation_split) for count in class_counts.values())
    return sum(class_counts.values()) - validation, validation


def split_can_choose(class_counts: dict[str, int], validation_split: float) -> bool:
    """Whether `validation_split` of a dataset with these class counts holds enough validation examples
    (MIN_VALIDATION_PER_CLASS per class, on average) to choose an epoch by or to measure a gain on."""
    expected = sum(count * validation_split for count in class_counts.values())
    return expected >= MIN_VALIDATION_PER_CLASS * len(class_counts)


def report_folds(class_counts: dict[str, int], validation_split: float) -> int:
    """The folds of the cross-validation that measures a baseline comparison when the client chose no
    held-out data: none when the split's validation data would hold enough examples per class; else 5, or
    as many as the smallest class has examples (at least 2; below that, none)."""
    if not class_counts or split_can_choose(class_counts, validation_split):
        return 0
    smallest = min(class_counts.values())
    return min(MAX_FOLDS, smallest) if smallest >= 2 else 0


def epochs_for(default_epochs: int, batch_size: int, train_examples: int) -> int:
    """The default number of epochs for a dataset of `train_examples`: at least MIN_STEPS steps, at most
    MAX_EPOCHS_FACTOR times the table's epochs."""
    steps_per_epoch = max(1, math.ceil(train_examples / batch_size))
    return min(
        max(default_epochs, math.ceil(MIN_STEPS / steps_per_epoch)), default_epochs * MAX_EPOCHS_FACTOR
    )


def defaults_table() -> str:
    """Markdown table of the defaults, for /docs."""
    lines = [
        "| base architecture | method | epochs | batch_size | learning_rate |",
        "|---|---|---|---|---|",
    ]
    for (arch, method), values in METHOD_DEFAULTS.items():
        lines.append(
            f"| {arch} | {method} | {values['epochs']} | {values['batch_size']} | {values['learning_rate']:g} |"
        )
    common = ", ".join(f"`{k}` {v}" for k, v in COMMON_DEFAULTS.items())
    common += (
        f". Small datasets get more epochs than the table's (up to {MAX_EPOCHS_FACTOR}x), so that training "
        f"takes at least {MIN_STEPS} steps. full, partial and lora first fit a new head on the frozen "
        f"backbone's features for `head_warmup_epochs` ({HEAD_WARMUP_EPOCHS}; a kept head is fitted from its "
        "source weights). The `full` rows of resnet-small, cnn-small and mlp are for random weights: "
        "fine-tuning learned ones (a model a pretrain job made) runs at "
        + ", ".join(f"{arch} {factor:g}x" for arch, factor in LEARNED_FULL_LR_FACTOR.items())
        + " that rate. "
        f"`model_selection` auto: the best epoch on validation data of at least {MIN_VALIDATION_PER_CLASS} "
        "examples per class (or with early_stopping), else the last; when the default `validation_split` "
        "would hold fewer than that and the job is measured on an evaluation_dataset (and no "
        "validation_dataset, split, selection, early stopping or baseline is asked for), it is 0: every label "
        "trains; `augmentation` auto: light for up to 10,000 training images "
        "trained 100 steps or more; "
        "`batch_norm_statistics` auto: re-estimated on the training data for a full fine-tune when they differ "
        "from the stored ones (AdaBN)"
    )
    return (
        "\n".join(lines)
        + f"\n\nEvery method: {common}. `partial`: `unfreeze_blocks` (minilm-l6 2, efficientnet-lite0 4, "
        "cnn-small and mlp 1), `layer_lr_decay` 0.8. `full`: `layer_lr_decay` 1.0. `lora`: `lora_rank` 8, "
        "`lora_alpha` 16, `lora_dropout` 0.1, `lora_target_modules` per backbone (minilm-l6: query, value; "
        "efficientnet-lite0: the 1x1 convolutions; cnn-small: its convolutions)."
    )


# What the scratch arm of a study shares with the transferred arm: the budget, the data and the selection.
SCRATCH_SHARES = (
    "epochs",
    "batch_size",
    "weight_decay",
    "validation_split",
    "warmup_ratio",
    "max_grad_norm",
    "early_stopping",
    "augmentation",
    "model_selection",
)


def scratch_hyperparameters(transferred: dict[str, Any], architecture: str) -> dict[str, Any]:
    """The scratch arm's hyperparameters: the same architecture with random weights, trained in full for the
    same epochs on the same data, with the same augmentation and model selection, at the architecture's
    from-scratch learning rate (a fine-tuning rate, lower, would handicap it)."""
    return {
        **{key: transferred[key] for key in SCRATCH_SHARES if key in transferred},
        "learning_rate": METHOD_DEFAULTS[(architecture, "full")]["learning_rate"],
        "layer_lr_decay": 1.0,
        "freeze_batch_norm": False,  # random weights have no statistics worth keeping
    }


# finetune with an unlabeled_dataset: the semi-supervised loss.
SEMI_SUPERVISED_DEFAULTS = {"unlabeled_weight": 1.0, "confidence_threshold": 0.95, "unlabeled_ratio": 3}


# adapt and distill: their own settings beside the method's defaults.
ADAPTATION_DEFAULTS = {"adaptation_weight": 1.0, "pseudo_label_threshold": 0.9, "mcc_temperature": 2.5}
DISTILLATION_DEFAULTS = {"temperature": 4.0, "alpha": 0.5}
# A student matching soft targets needs longer than fine-tuning needs to fit labels: unless the client
# chose the epochs, distillation runs this many times the architecture's (data-scaled) default.
DISTILLATION_EPOCHS_FACTOR = 3


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
