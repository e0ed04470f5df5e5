"""Serving registered models over HTTP: loaded on first use, kept in a small LRU cache, run on the
API's CPU (or GPU when it has one) with the same preprocessing the model was trained with."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from app.core.errors import Unprocessable
from app.core.storage import Storage
from app.datasets.formats import ArchiveLimits, FormatError, decode_image
from app.tables import Model

PREDICT_BATCH = 64


@dataclass
class LoadedModel:
    network: Any  # workers.backbones.networks.TransferModel
    spec: Any  # workers.backbones.spec.ModelSpec
    pipeline: Any  # text pipeline, or None
    lock: threading.Lock


class ModelServer:
    def __init__(self, storage: Storage, capacity: int, limits: ArchiveLimits) -> None:
        self.storage = storage
        self.capacity = capacity
        self.limits = limits
        self._cache: OrderedDict[tuple[str, str], LoadedModel] = OrderedDict()
        self._lock = threading.Lock()

    def _load(self, row: Model) -> LoadedModel:
        key = (row.id, row.weights_sha256)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        from workers.backbones.preprocess import TextPipeline
        from workers.backbones.spec import ModelSpec
        from workers.backbones.weights import load_model

        spec = ModelSpec.model_validate(row.spec)
        network = load_model(self.storage.path(row.weights_path), spec).eval()
        loaded = LoadedModel(
            network=network,
            spec=spec,
            pipeline=TextPipeline(spec) if spec.modality == "text" else None,
            lock=threading.Lock(),
        )
        with self._lock:
            self._cache[key] = loaded
            while len(self._cache) > self.capacity:
                self._cache.popitem(last=False)
        return loaded

    def _prepare(self, loaded: LoadedModel, inputs: Sequence[Any]) -> Any:
        """Validate inputs for the model's modality; returns a function from index list to batch."""
        from workers.backbones.preprocess import InputError, images_to_tensor, prepare_image, rows_to_array

        modality = loaded.spec.modality
        if modality == "text":
            for i, text in enumerate(inputs):
                if not isinstance(text, str):
                    raise Unprocessable(
                        f"inputs[{i}]: a text model takes strings", param="inputs", code="invalid_input"
                    )
                if not text.strip():
                    raise Unprocessable(f"inputs[{i}]: empty text", param="inputs", code="invalid_input")
            return lambda idx: loaded.pipeline([inputs[i] for i in idx])
        if modality == "tabular":
            import torch

            try:
                array = rows_to_array(inputs, loaded.spec.input_spec["feature_columns"])
            except InputError as exc:
                raise Unprocessable(str(exc), param="inputs", code="invalid_input") from None
            values = torch.from_numpy(array)
            return lambda idx: values[idx]
        arrays = []
        for i, (name, data) in enumerate(inputs):
            try:
                image = decode_image(data, name, self.limits)
            except FormatError as exc:
                raise Unprocessable(
                    f"files[{i}]: {exc.message}", param="files", code="invalid_input"
                ) from None
            arrays.append(prepare_image(image, loaded.spec.input_spec))
        return lambda idx: images_to_tensor([arrays[i] for i in idx], loaded.spec.input_spec)

    def evaluate(self, row: Model, dataset: Any) -> dict[str, Any]:
        """Scores of the model on a labelled dataset (a workers.recipes.base.DatasetSource)."""
        from workers.recipes.evaluate import evaluate_model

        loaded = self._load(row)
        with loaded.lock:
            return evaluate_model(loaded.network, loaded.spec, dataset, device="cpu")

    def predict(self, row: Model, inputs: Sequence[Any]) -> list[dict[str, Any]]:
        import torch

        loaded = self._load(row)
        make_batch = self._prepare(loaded, inputs)
        classes = loaded.spec.classes
        out: list[dict[str, Any]] = []
        with loaded.lock, torch.inference_mode():
            for start in range(0, len(inputs), PREDICT_BATCH):
                idx = list(range(start, min(start + PREDICT_BATCH, len(inputs))))
                probabilities = loaded.network(make_batch(idx)).float().softmax(dim=1)
                for row_p in probabilities.tolist():
                    best = max(range(len(classes)), key=row_p.__getitem__)
                    out.append(
                        {
                            "label": classes[best],
                            "probabilities": {c: round(p, 6) for c, p in zip(classes, row_p, strict=True)},
                        }
                    )
        return out
