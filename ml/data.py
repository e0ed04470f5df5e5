"""Datasets as model inputs: read a stored dataset, map labels to head indices, split, and build batches
with the same preprocessing the served model uses."""

from __future__ import annotations

import io
import zipfile
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from graft.defaults import validation_count
from graft.formats import (
    GREY_MODES,
    ArchiveLimits,
    ImageGeometry,
    geometry_of,
    open_archive,
    read_member,
    read_tabular,
    read_text,
    scan_archive,
)
from graft.sources import DatasetSource
from graft.spec import ModelSpec
from ml.preprocess import TextPipeline, images_to_tensor, prepare_image

# The archive passed the service's limits at upload; reading it again must not apply other ones.
ALREADY_VALIDATED = ArchiveLimits(
    max_members=2**62,
    max_uncompressed_bytes=2**62,
    max_compression_ratio=float("inf"),
    max_image_pixels=2**62,
)

# Decoded images are kept as uint8 up to this many bytes per dataset, so later epochs skip decoding.
IMAGE_CACHE_BYTES = 2 * 1024**3


class Inputs:
    """Indexable model inputs of one dataset; `batch(indices)` returns CPU tensors for the network."""

    def __len__(self) -> int:
        raise NotImplementedError

    def batch(self, indices: Sequence[int]) -> Any:
        raise NotImplementedError

    def inference_order(self) -> list[int]:
        """An order for batching without gradients (the result is put back in dataset order)."""
        return list(range(len(self)))


class TextInputs(Inputs):
    def __init__(self, texts: Sequence[str], spec: ModelSpec) -> None:
        self.pipeline = TextPipeline(spec)
        self.token_ids = self.pipeline.tokenize(texts)

    def __len__(self) -> int:
        return len(self.token_ids)

    def batch(self, indices: Sequence[int]) -> dict[str, Tensor]:
        return self.pipeline.collate([self.token_ids[i] for i in indices])

    def inference_order(self) -> list[int]:
        # Texts of similar length side by side: batches are padded to their longest text.
        return sorted(range(len(self.token_ids)), key=lambda i: len(self.token_ids[i]))


class ImageInputs(Inputs):
    def __init__(self, source: DatasetSource, names: Sequence[str], spec: ModelSpec) -> None:
        self.path = source.path
        self.names = list(names)
        self.input_spec = spec.input_spec
        self._archive: zipfile.ZipFile | None = None
        per_image = int(
            np.prod([self.input_spec.get("channels", 3), self.input_spec["height"], self.input_spec["width"]])
        )
        self._cache_enabled = per_image * len(self.names) <= IMAGE_CACHE_BYTES
        self._cache: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.names)

    def _image(self, index: int) -> np.ndarray:
        cached = self._cache.get(index)
        if cached is not None:
            return cached
        if self._archive is None:
            self._archive = open_archive(self.path)
        array = prepare_image(read_member(self._archive, self.names[index]), self.input_spec)
        if self._cache_enabled:
            self._cache[index] = array
        return array

    def batch(self, indices: Sequence[int]) -> Tensor:
        return images_to_tensor([self._image(i) for i in indices], self.input_spec)


GEOMETRY_SAMPLE = 256


def image_geometry(source: DatasetSource) -> ImageGeometry:
    """The typical size and colour of a dataset's images: the median shorter side, between 16 and 128 px,
    rounded to a multiple of 4; grey when all are grey. From what the upload recorded of every image (the
    numbers a job's plan was made with), or, for a dataset uploaded before it recorded them, from the
    headers of up to 256 of its images, evenly spread."""
    from PIL import Image

    recorded = source.profile.get("image_sizes")
    if recorded and recorded.get("shorter_side"):
        return geometry_of(float(recorded["shorter_side"]["median"]), bool(recorded["grey"]))
    with open_archive(source.path) as archive:
        names = [name for name, _ in scan_archive(archive, ALREADY_VALIDATED).entries]
        step = max(1, len(names) // GEOMETRY_SAMPLE)
        sides, grey = [], True
        for name in names[::step][:GEOMETRY_SAMPLE]:
            with Image.open(io.BytesIO(read_member(archive, name))) as image:
                sides.append(min(image.size))
                grey = grey and image.mode in GREY_MODES
    return geometry_of(float(np.median(sides)) if sides else 32.0, grey)


class TabularInputs(Inputs):
    def __init__(self, values: np.ndarray) -> None:
        self.values = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32))

    def __len__(self) -> int:
        return int(self.values.shape[0])

    def batch(self, indices: Sequence[int]) -> Tensor:
        return self.values[torch.as_tensor(list(indices), dtype=torch.long)]


def load_inputs(source: DatasetSource, spec: ModelSpec) -> tuple[Inputs, list[str] | None]:
    """The dataset's inputs for a network of `spec`, and its labels (None when unlabelled)."""
    if source.task == "text_classification":
        texts, labels = read_text(source.path, source.format, source.schema_info)
        return TextInputs(texts, spec), labels
    if source.task == "tabular_classification":
        values, labels = read_tabular(source.path, source.format, source.schema_info)
        wanted = spec.input_spec.get("feature_columns")
        have = source.schema_info["feature_columns"]
        if wanted and list(wanted) != list(have):
            index = [have.index(column) for column in wanted]
            values = values[:, index]
        return TabularInputs(values), labels
    if source.task == "image_classification":
        with open_archive(source.path) as archive:
            scanned = scan_archive(archive, ALREADY_VALIDATED)
        names = [name for name, _ in scanned.entries]
        labels = [str(label) for _, label in scanned.entries] if scanned.layout == "class_folders" else None
        return ImageInputs(source, names, spec), labels
    raise ValueError(f"unknown task {source.task!r}")


def read_labels(source: DatasetSource) -> list[str]:
    """A labelled dataset's labels, in order, without preparing its inputs."""
    if source.task == "text_classification":
        _, labels = read_text(source.path, source.format, source.schema_info)
    elif source.task == "tabular_classification":
        _, labels = read_tabular(source.path, source.format, source.schema_info)
    else:
        with open_archive(source.path) as archive:
            scanned = scan_archive(archive, ALREADY_VALIDATED)
        labels = [str(label) for _, label in scanned.entries] if scanned.layout == "class_folders" else None
    if labels is None:
        raise ValueError(f"dataset {source.id} has no labels")
    return labels


def stratified_folds(labels: Tensor, folds: int, seed: int) -> list[list[int]]:
    """`folds` disjoint sets of positions covering every example, each class dealt round-robin from a seeded
    shuffle (so each fold holds each class's share, to within one example)."""
    rng = np.random.default_rng(seed)
    out: list[list[int]] = [[] for _ in range(folds)]
    start = 0
    for cls in torch.unique(labels).tolist():
        members = np.flatnonzero(labels.numpy() == cls)
        rng.shuffle(members)
        for j, position in enumerate(members.tolist()):
            out[(start + j) % folds].append(position)
        start += len(members)  # the next class starts where this one stopped: folds stay balanced in size
    return [sorted(fold) for fold in out]


def label_indices(labels: Sequence[str], classes: Sequence[str]) -> Tensor:
    position = {name: i for i, name in enumerate(classes)}
    unknown = sorted({label for label in labels if label not in position})
    if unknown:
        raise ValueError(f"labels not among the model's classes: {', '.join(unknown[:5])}")
    return torch.tensor([position[label] for label in labels], dtype=torch.long)


def stratified_split(labels: Tensor, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """A seeded split that keeps each class's share; classes with fewer than 2 examples stay in train."""
    if fraction <= 0:
        return list(range(len(labels))), []
    rng = np.random.default_rng(seed)
    train: list[int] = []
    held_out: list[int] = []
    for cls in torch.unique(labels).tolist():
        members = np.flatnonzero(labels.numpy() == cls)
        rng.shuffle(members)
        n_val = validation_count(len(members), fraction)
        held_out.extend(members[:n_val].tolist())
        train.extend(members[n_val:].tolist())
    return sorted(train), sorted(held_out)


class Subset(Inputs):
    def __init__(self, inputs: Inputs, indices: Sequence[int]) -> None:
        self.inputs = inputs
        self.indices = list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def batch(self, indices: Sequence[int]) -> Any:
        return self.inputs.batch([self.indices[i] for i in indices])


def batches(
    n: int, batch_size: int, *, shuffle: bool, generator: torch.Generator | None = None
) -> list[list[int]]:
    order = torch.randperm(n, generator=generator).tolist() if shuffle else list(range(n))
    return [order[i : i + batch_size] for i in range(0, n, batch_size)]


def draw(queue: list[int], size: int, count: int, generator: torch.Generator) -> tuple[list[int], list[int]]:
    """`size` positions into `count` examples from an endless stream of shuffled passes over them, and the
    rest of the stream (`queue`: what the last draw left; kept in a resume state so a resumed run draws the
    same examples)."""
    while len(queue) < size:
        queue = queue + torch.randperm(count, generator=generator).tolist()
    return queue[:size], queue[size:]
