"""Per-backbone, per-method default hyperparameters (no torch import: the API documents and resolves
them). A job that names none of them should still give a good result."""

from __future__ import annotations

from typing import Any

from workers.backbones.catalog import BUILTIN_MODELS

COMMON_DEFAULTS: dict[str, Any] = {
    "weight_decay": 0.01,
    "validation_split": 0.1,
    "warmup_ratio": 0.06,
    "max_grad_norm": 1.0,
    "early_stopping": None,
}

# (architecture, method) -> epochs, batch_size, learning_rate
METHOD_DEFAULTS: dict[tuple[str, str], dict[str, Any]] = {
    ("minilm-l6", "linear_probe"): {"epochs": 30, "batch_size": 32, "learning_rate": 1e-2},
    ("minilm-l6", "full"): {"epochs": 4, "batch_size": 16, "learning_rate": 5e-5},
    ("minilm-l6", "partial"): {"epochs": 6, "batch_size": 16, "learning_rate": 2e-4},
    ("minilm-l6", "lora"): {"epochs": 6, "batch_size": 16, "learning_rate": 1e-3},
    ("efficientnet-lite0", "linear_probe"): {"epochs": 30, "batch_size": 32, "learning_rate": 1e-2},
    ("efficientnet-lite0", "full"): {"epochs": 8, "batch_size": 32, "learning_rate": 3e-4},
    ("efficientnet-lite0", "partial"): {"epochs": 10, "batch_size": 32, "learning_rate": 1e-3},
    ("efficientnet-lite0", "lora"): {"epochs": 10, "batch_size": 32, "learning_rate": 2e-3},
    ("cnn-small", "linear_probe"): {"epochs": 30, "batch_size": 32, "learning_rate": 1e-2},
    ("cnn-small", "full"): {"epochs": 15, "batch_size": 32, "learning_rate": 2e-3},
    ("cnn-small", "partial"): {"epochs": 15, "batch_size": 32, "learning_rate": 2e-3},
    ("cnn-small", "lora"): {"epochs": 15, "batch_size": 32, "learning_rate": 3e-3},
    ("mlp", "linear_probe"): {"epochs": 30, "batch_size": 32, "learning_rate": 1e-2},
    ("mlp", "full"): {"epochs": 30, "batch_size": 32, "learning_rate": 2e-3},
    ("mlp", "partial"): {"epochs": 30, "batch_size": 32, "learning_rate": 2e-3},
}

LORA_DEFAULTS: dict[str, Any] = {
    "lora_rank": 8,
    "lora_alpha": 16,
    "lora_dropout": 0.1,
    "lora_target_modules": None,
}


def method_defaults(architecture: str, method: str) -> dict[str, Any]:
    """Knobs that only some methods have: partial's unfrozen blocks and layer-wise learning-rate decay,
    LoRA's rank, alpha, dropout and target modules (None: the backbone's own choice)."""
    if method == "partial":
        return {
            "unfreeze_blocks": BUILTIN_MODELS[architecture].default_unfreeze_blocks,
            "layer_lr_decay": 0.8,
        }
    if method == "full":
        return {"layer_lr_decay": 1.0}
    if method == "lora":
        return dict(LORA_DEFAULTS)
    return {}


def default_hyperparameters(architecture: str, method: str) -> dict[str, Any]:
    return {
        **COMMON_DEFAULTS,
        **METHOD_DEFAULTS[(architecture, method)],
        **method_defaults(architecture, method),
    }


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
    return (
        "\n".join(lines)
        + f"\n\nEvery method: {common}. `partial`: `unfreeze_blocks` (minilm-l6 2, efficientnet-lite0 4, "
        "cnn-small and mlp 1), `layer_lr_decay` 0.8. `full`: `layer_lr_decay` 1.0. `lora`: `lora_rank` 8, "
        "`lora_alpha` 16, `lora_dropout` 0.1, `lora_target_modules` per backbone (minilm-l6: query, value; "
        "efficientnet-lite0: the 1x1 convolutions; cnn-small: its convolutions)."
    )
