"""ModelSpec: everything needed to rebuild a network and prepare its inputs, stored with every model and
inside every weights file (safetensors metadata), so weights never travel without their meaning."""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, Field

from graft.catalog import BUILTIN_MODELS, Modality

SPEC_METADATA_KEY = "graft_spec"


class ModelSpec(BaseModel):
    architecture: str = Field(description="A built-in architecture id, such as minilm-l6.")
    modality: Modality
    classes: list[str] = Field(default_factory=list, description="Output labels, in head order.")
    input_spec: dict[str, Any] = Field(default_factory=dict)
    options: dict[str, Any] = Field(default_factory=dict, description="Architecture options (mlp sizes).")

    @classmethod
    def for_builtin(cls, architecture: str) -> ModelSpec:
        builtin = BUILTIN_MODELS[architecture]
        return cls(architecture=architecture, modality=builtin.modality, input_spec=dict(builtin.input_spec))

    @property
    def feature_dim(self) -> int | None:
        """Width of the backbone's features, as the architecture options set it."""
        if self.architecture in ("cnn-small", "resnet-small"):
            return 4 * int(self.options.get("width", 32))
        if self.architecture == "mlp":
            hidden = self.options.get("hidden") or [128, 128]
            return int(hidden[-1])
        return BUILTIN_MODELS[self.architecture].feature_dim

    def with_classes(self, classes: list[str]) -> ModelSpec:
        return self.model_copy(update={"classes": list(classes)})

    def to_metadata(self) -> str:
        return json.dumps(self.model_dump(), sort_keys=True)

    @classmethod
    def from_metadata(cls, text: str) -> ModelSpec:
        return cls.model_validate_json(text)
