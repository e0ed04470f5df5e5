"""Serving registered models over HTTP: loaded on first use, kept in a small LRU cache, run on the
API's CPU (or GPU when it has one) with the same preprocessing the model was trained with."""

from __future__ import annotations

import asyncio
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from app.core.errors import Unprocessable
from graft.errors import NonFiniteOutput
from graft.formats import ArchiveLimits, FormatError, decode_image, image_size
from graft.storage import Storage
from graft.tables import Model

PREDICT_BATCH = 64

# Seconds per example (a forward pass, batched, on the reference machine's CPU) until this API process has
# measured the architecture itself, and seconds to load a model the first time. Pessimistic on purpose: an
# evaluation that might not finish within the request becomes a job. Images cost per pixel on top (PNG
# decoding and resizing, ~30 ns a pixel here: a 6300x6300 image takes a second whatever it is resized to).
PRIOR_SECONDS_PER_EXAMPLE = {
    "minilm-l6": 0.01,
    "efficientnet-lite0": 0.03,
    "resnet-small": 0.003,
    "cnn-small": 0.003,
    "mlp": 0.0005,
}
PRIOR_LOAD_SECONDS = {
    "minilm-l6": 3.0,
    "efficientnet-lite0": 2.0,
    "resnet-small": 0.5,
    "cnn-small": 0.5,
    "mlp": 0.2,
}
SECONDS_PER_PIXEL = 3e-8


@dataclass(frozen=True)
class CheckedInputs:
    """What the bounds check found: the images' pixels (from their headers), and the columns of table rows
    the model does not read (at most MAX_IGNORED_COLUMNS of them named)."""

    pixels: int = 0
    ignored_columns: tuple[str, ...] = ()


MAX_IGNORED_COLUMNS = 20


@dataclass(frozen=True)
class ServingLimits:
    max_text_chars: int = 20_000
    max_predict_chars: int = 1_000_000
    max_predict_pixels: int = 100_000_000


@dataclass
class CostModel:
    """What serving an architecture costs on this process, measured as it serves (moving averages of the
    cost per example, pixels decoded apart: a few huge images and many tiny ones cost what they cost)."""

    seconds_per_example: dict[str, float] = field(default_factory=dict)
    load_seconds: dict[str, float] = field(default_factory=dict)

    def per_example(self, architecture: str) -> float:
        return self.seconds_per_example.get(architecture, PRIOR_SECONDS_PER_EXAMPLE.get(architecture, 0.05))

    def estimate(self, architecture: str, examples: int, pixels: int = 0) -> float:
        return examples * self.per_example(architecture) + pixels * SECONDS_PER_PIXEL

    def observe(self, architecture: str, examples: int, seconds: float, pixels: int = 0) -> None:
        if examples <= 0:
            return
        measured = max(seconds - pixels * SECONDS_PER_PIXEL, 0.0) / examples
        known = self.seconds_per_example.get(architecture)
        self.seconds_per_example[architecture] = measured if known is None else 0.7 * known + 0.3 * measured


@dataclass
class LoadedModel:
    network: Any  # ml.networks.TransferModel
    spec: Any  # graft.spec.ModelSpec
    pipeline: Any  # text pipeline, or None
    lock: threading.Lock
    bytes: int = 0  # of its tensors


class ModelServer:
    def __init__(
        self,
        storage: Storage,
        capacity: int,
        limits: ArchiveLimits,
        serving_limits: ServingLimits | None = None,
        max_bytes: int = 1024**3,
    ) -> None:
        self.storage = storage
        self.capacity = capacity
        self.max_bytes = max_bytes
        self.limits = limits
        self.serving_limits = serving_limits or ServingLimits()
        self.costs = CostModel()
        self._cache: OrderedDict[tuple[str, str], LoadedModel] = OrderedDict()
        self._lock = threading.Lock()
        self._turns: dict[tuple[str, str], asyncio.Lock] = {}

    def turn(self, row: Model) -> asyncio.Lock:
        """Requests of one model take turns here, in the event loop, before they take a thread: a request
        waiting for a busy model holds no thread that another model's request could use."""
        key = (row.id, row.weights_sha256)
        lock = self._turns.get(key)
        if lock is None:
            if len(self._turns) > 1000:  # forget models nobody is waiting for
                self._turns = {k: v for k, v in self._turns.items() if v.locked()}
            lock = self._turns[key] = asyncio.Lock()
        return lock

    def is_loaded(self, row: Model) -> bool:
        with self._lock:
            return (row.id, row.weights_sha256) in self._cache

    def load_seconds(self, architecture: str) -> float:
        return self.costs.load_seconds.get(architecture, PRIOR_LOAD_SECONDS.get(architecture, 3.0))

    def estimate_seconds(self, row: Model, examples: int, pixels: int = 0) -> float:
        """How long serving `examples` inputs (of `pixels` in all) with this model would take here, loading
        it included."""
        load = 0.0 if self.is_loaded(row) else self.load_seconds(row.architecture)
        return load + self.costs.estimate(row.architecture, examples, pixels)

    def _load(self, row: Model) -> LoadedModel:
        key = (row.id, row.weights_sha256)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        from graft.spec import ModelSpec
        from ml.preprocess import TextPipeline
        from ml.weights import load_model

        started = time.perf_counter()
        spec = ModelSpec.model_validate(row.spec)
        weights = self.storage.existing(row.weights_path, f"the weights file of model {row.id}")
        network = load_model(weights, spec).eval()
        loaded = LoadedModel(
            network=network,
            spec=spec,
            pipeline=TextPipeline(spec) if spec.modality == "text" else None,
            lock=threading.Lock(),
            bytes=sum(t.numel() * t.element_size() for t in network.state_dict().values()),
        )
        with self._lock:
            self._cache[key] = loaded
            # The least recently used go first, by count and by weight; the one just loaded always stays.
            while len(self._cache) > 1 and (
                len(self._cache) > self.capacity
                or sum(m.bytes for m in self._cache.values()) > self.max_bytes
            ):
                self._cache.popitem(last=False)
            self.costs.load_seconds[row.architecture] = time.perf_counter() - started
        return loaded

    def check_inputs(
        self, modality: str, inputs: Sequence[Any], feature_columns: Sequence[str] = ()
    ) -> CheckedInputs:
        """Bounds on what one request may ask of the model, checked before anything is decoded or
        tokenised: characters of text (each input and all together), decoded pixels of images; and the
        columns of table rows that are not among the model's `feature_columns` (they are not read)."""
        limits = self.serving_limits
        if modality == "tabular":
            wanted = set(feature_columns)
            ignored: set[str] = set()
            for row in inputs:
                if isinstance(row, Mapping):
                    ignored.update(key for key in row if key not in wanted)
                    if len(ignored) >= MAX_IGNORED_COLUMNS:
                        break
            return CheckedInputs(ignored_columns=tuple(sorted(ignored)[:MAX_IGNORED_COLUMNS]))
        if modality == "text":
            total = 0
            for i, text in enumerate(inputs):
                if not isinstance(text, str):
                    raise Unprocessable(
                        f"inputs[{i}]: a text model takes strings", param="inputs", code="invalid_input"
                    )
                if len(text) > limits.max_text_chars:
                    raise Unprocessable(
                        f"inputs[{i}]: {len(text)} characters; at most {limits.max_text_chars} per input (the "
                        "model reads only its first max_length tokens)",
                        param="inputs",
                        code="input_too_long",
                    )
                total += len(text)
            if total > limits.max_predict_chars:
                raise Unprocessable(
                    f"{total} characters of text in one request; at most {limits.max_predict_chars}",
                    param="inputs",
                    code="input_too_long",
                )
        elif modality == "image":
            pixels = 0
            for i, (name, data) in enumerate(inputs):
                try:
                    width, height = image_size(data, name, self.limits)
                except FormatError as exc:
                    raise Unprocessable(
                        f"files[{i}]: {exc.message}", param="files", code="invalid_input"
                    ) from None
                pixels += width * height
                if pixels > limits.max_predict_pixels:
                    raise Unprocessable(
                        f"the images of this request have more than {limits.max_predict_pixels} pixels in all "
                        f"(reached at files[{i}]); send fewer or smaller images per request",
                        param="files",
                        code="input_too_large",
                    )
            return CheckedInputs(pixels=pixels)
        return CheckedInputs()

    def _prepare(self, loaded: LoadedModel, inputs: Sequence[Any]) -> Any:
        """Validate inputs for the model's modality; returns a function from index list to batch."""
        from ml.preprocess import InputError, images_to_tensor, prepare_image, rows_to_array

        modality = loaded.spec.modality
        if modality == "text":
            for i, text in enumerate(inputs):
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

    def evaluate(
        self, row: Model, dataset: Any, on_batch: Callable[[], None] | None = None, pixels: int = 0
    ) -> dict[str, Any]:
        """Scores of the model on a labelled dataset (a ml.runtime.DatasetSource, whose images hold
        `pixels` in all); `on_batch` is called after every batch (and may raise to stop)."""
        from ml.metrics import evaluate_model

        loaded = self._load(row)
        with loaded.lock:
            started = time.perf_counter()
            metrics = evaluate_model(loaded.network, loaded.spec, dataset, device="cpu", on_batch=on_batch)
            self.costs.observe(
                row.architecture,
                int(metrics.get("num_examples", 0)),
                time.perf_counter() - started,
                pixels,
            )
            return metrics

    def predict(self, row: Model, inputs: Sequence[Any], top_k: int = 5) -> list[dict[str, Any]]:
        """The label and the `top_k` most probable classes (most probable first) of every input."""
        import torch

        loaded = self._load(row)
        classes = loaded.spec.classes
        k = min(top_k, len(classes))
        out: list[dict[str, Any]] = []
        pixels = self.check_inputs(loaded.spec.modality, inputs).pixels
        with loaded.lock, torch.inference_mode():
            started = time.perf_counter()
            make_batch = self._prepare(loaded, inputs)
            for start in range(0, len(inputs), PREDICT_BATCH):
                idx = list(range(start, min(start + PREDICT_BATCH, len(inputs))))
                probabilities = loaded.network(make_batch(idx)).float().softmax(dim=1)
                finite = torch.isfinite(probabilities).all(dim=1)
                if not bool(finite.all()):
                    first = idx[int((~finite).nonzero()[0])]
                    raise NonFiniteOutput(
                        f"inputs[{first}]: the model's output is not a number (NaN or infinity): its weights, "
                        "or this input, hold values it cannot compute with",
                        param="inputs",
                    )
                values, indices = probabilities.topk(k, dim=1)
                for row_values, row_indices in zip(values.tolist(), indices.tolist(), strict=True):
                    out.append(
                        {
                            "label": classes[row_indices[0]],
                            "probabilities": {
                                classes[c]: round(p, 6) for c, p in zip(row_indices, row_values, strict=True)
                            },
                        }
                    )
            self.costs.observe(row.architecture, len(inputs), time.perf_counter() - started, pixels)
        return out
