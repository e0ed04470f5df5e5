"""Per-backbone, per-method default hyperparameters (no torch import: the API documents and resolves
them). A job that names none of them should still give a good result."""

from __future__ import annotations

from typing import Any

COMMON_DEFAULTS: dict[str, Any] = {
    "weight_decay": 0.01,
    "validation_split": 0.1,
    "warmup_ratio": 0.06,
    "max_grad_norm": 1.0,
}

# (architecture, method) -> epochs, batch_size, learning_rate
METHOD_DEFAULTS: dict[tuple[str, str], dict[str, Any]] = {
    ("minilm-l6", "linear_probe"): {"epochs": 30, "batch_size": 32, "learning_rate": 1e-2},
    ("minilm-l6", "full"): {"epochs": 4, "batch_size": 16, "learning_rate": 5e-5},
    ("efficientnet-lite0", "linear_probe"): {"epochs": 30, "batch_size": 32, "learning_rate": 1e-2},
    ("efficientnet-lite0", "full"): {"epochs": 8, "batch_size": 32, "learning_rate": 3e-4},
    ("cnn-small", "linear_probe"): {"epochs": 30, "batch_size": 32, "learning_rate": 3e-3},
    ("cnn-small", "full"): {"epochs": 15, "batch_size": 32, "learning_rate": 2e-3},
    ("mlp", "linear_probe"): {"epochs": 30, "batch_size": 32, "learning_rate": 3e-3},
    ("mlp", "full"): {"epochs": 30, "batch_size": 32, "learning_rate": 2e-3},
}


def default_hyperparameters(architecture: str, method: str) -> dict[str, Any]:
    return {**COMMON_DEFAULTS, **METHOD_DEFAULTS[(architecture, method)]}


def defaults_table() -> str:
    """Markdown table of the defaults, for /docs."""
    lines = ["| base architecture | method | epochs | batch_size | learning_rate |", "|---|---|---|---|---|"]
    for (arch, method), values in METHOD_DEFAULTS.items():
        lines.append(
            f"| {arch} | {method} | {values['epochs']} | {values['batch_size']} | {values['learning_rate']:g} |"
        )
    common = ", ".join(f"`{k}` {v:g}" for k, v in COMMON_DEFAULTS.items())
    return "\n".join(lines) + f"\n\nEvery method: {common}."
