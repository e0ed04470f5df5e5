"""Fine-tuning: transfer an upstream model to a labelled downstream dataset.

Methods:
- `linear_probe`: the backbone is frozen (and kept in eval mode, so not even its normalisation
  statistics move); its features are computed once per example and the new head trains on them.
- `full`: every parameter trains, starting from the upstream weights.

The loop: AdamW, linear warm-up then cosine decay, gradient clipping, mixed precision on CUDA, one
checkpoint per epoch (the tensors the method trains), metrics after every epoch.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, Field
from torch import Tensor, nn

from workers.backbones.networks import TransferModel, build_model, count_parameters
from workers.backbones.spec import ModelSpec
from workers.backbones.weights import load_model
from workers.recipes.base import (
    BaseModelSource,
    DatasetSource,
    JobCancelled,
    RecipeConfig,
    Reporter,
    autocast_dtype,
    pick_device,
    seed_everything,
    to_device,
)
from workers.recipes.data import Inputs, Subset, batches, label_indices, load_inputs, stratified_split

FEATURE_BATCH_SIZE = 64


class Hyperparameters(BaseModel):
    epochs: int = Field(ge=1)
    batch_size: int = Field(ge=1)
    learning_rate: float = Field(gt=0)
    weight_decay: float = Field(ge=0)
    validation_split: float = Field(ge=0, lt=1)
    warmup_ratio: float = Field(ge=0, lt=1)
    max_grad_norm: float = Field(gt=0)


class FinetuneConfig(RecipeConfig):
    method: Literal["full", "linear_probe"]
    base: BaseModelSource
    train: DatasetSource
    validation: DatasetSource | None = None
    hyperparameters: Hyperparameters


@dataclass
class FinetuneResult:
    spec: ModelSpec
    state: dict[str, Tensor]
    metrics: dict[str, float]
    history: list[dict[str, float]] = field(default_factory=list)
    num_parameters: int = 0
    transfer: dict[str, Any] = field(default_factory=dict)


def warmup_cosine(total_steps: int, warmup_ratio: float) -> Any:
    warmup = max(1, int(total_steps * warmup_ratio)) if warmup_ratio > 0 else 0

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


class FinetuneRecipe:
    def __init__(self, config: FinetuneConfig, reporter: Reporter) -> None:
        self.config = config
        self.reporter = reporter
        self.hp = config.hyperparameters
        self.device = pick_device(config.device)
        self.amp_dtype = autocast_dtype(self.device)
        self.step = 0

    # ------------------------------------------------------------------ setup

    def setup(self) -> None:
        config = self.config
        self.generator = seed_everything(config.seed)
        self.classes = list(config.train.classes)
        self.spec, self.model, self.transfer = self._build_model()
        self.reporter.event(
            f"Loaded {config.base.id} ({self.transfer['kind']} transfer, {self.transfer['head']} head) "
            f"on {self.device.type}",
            data={"transfer": self.transfer, "device": self.device.type},
        )

        train_inputs, train_labels = load_inputs(config.train, self.spec)
        assert train_labels is not None, "training dataset must be labelled"
        labels = label_indices(train_labels, self.classes)
        if config.validation is not None:
            val_inputs, val_labels = load_inputs(config.validation, self.spec)
            assert val_labels is not None, "validation dataset must be labelled"
            self.train_inputs: Inputs = train_inputs
            self.train_labels = labels
            self.val_inputs: Inputs | None = val_inputs
            self.val_labels: Tensor | None = label_indices(val_labels, self.classes)
        else:
            train_idx, val_idx = stratified_split(labels, self.hp.validation_split, config.seed)
            self.train_inputs = Subset(train_inputs, train_idx)
            self.train_labels = labels[train_idx]
            self.val_inputs = Subset(train_inputs, val_idx) if val_idx else None
            self.val_labels = labels[val_idx] if val_idx else None
        n_val = len(self.val_inputs) if self.val_inputs is not None else 0
        self.reporter.event(
            f"Data: {len(self.train_inputs)} training and {n_val} validation examples, {len(self.classes)} classes",
            data={"train_examples": len(self.train_inputs), "validation_examples": n_val},
        )

        if self.spec.architecture == "mlp" and config.base.weights_path is None:
            self._fit_input_statistics()

        self.model.to(self.device)
        if self.device.type == "cuda" and self.spec.modality == "image":
            self.model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]

        if config.method == "linear_probe":
            for parameter in self.model.backbone.parameters():
                parameter.requires_grad_(False)
            self.train_features = self._extract(self.train_inputs)
            self.val_features = self._extract(self.val_inputs) if self.val_inputs is not None else None
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            trainable, lr=self.hp.learning_rate, weight_decay=self.hp.weight_decay
        )
        self.steps_per_epoch = math.ceil(len(self.train_inputs) / self.hp.batch_size)
        self.total_steps = self.steps_per_epoch * self.hp.epochs
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, warmup_cosine(self.total_steps, self.hp.warmup_ratio)
        )

    def _build_model(self) -> tuple[ModelSpec, TransferModel, dict[str, Any]]:
        base = self.config.base
        spec = base.spec
        if spec.architecture == "mlp" and base.weights_path is None:
            columns = list(self.config.train.schema_info["feature_columns"])
            hidden = list(spec.input_spec.get("hidden", [128, 128]))
            spec = spec.model_copy(
                update={
                    "options": {"in_features": len(columns), "hidden": hidden},
                    "input_spec": {**spec.input_spec, "feature_columns": columns},
                }
            )
        target = spec.with_classes(self.classes)
        model = build_model(target, pretrained=base.pretrained and base.weights_path is None)
        same_labels = bool(spec.classes) and sorted(spec.classes) == sorted(self.classes)
        if base.weights_path is not None:
            upstream = load_model(base.weights_path, base.spec)
            model.backbone.load_state_dict(upstream.backbone.state_dict())
            if same_labels and upstream.head is not None and model.head is not None:
                # Domain transfer: the label set is the same; keep the head, matching classes by name.
                order = [spec.classes.index(name) for name in self.classes]
                with torch.no_grad():
                    model.head.weight.copy_(upstream.head.weight[order])
                    model.head.bias.copy_(upstream.head.bias[order])
        kind = "domain" if same_labels else "task"
        transfer = {
            "kind": kind,
            "head": "kept" if same_labels else "new",
            "base_classes": list(spec.classes),
        }
        return target, model, transfer

    def _fit_input_statistics(self) -> None:
        rows = self.train_inputs.batch(range(len(self.train_inputs)))
        backbone = self.model.backbone
        backbone.set_input_statistics(rows.mean(dim=0), rows.std(dim=0, unbiased=False))  # type: ignore[operator]

    @torch.no_grad()
    def _extract(self, inputs: Inputs) -> Tensor:
        """Backbone features of every example, computed once (frozen backbone, eval mode)."""
        self.model.backbone.eval()
        chunks = []
        for indices in batches(len(inputs), FEATURE_BATCH_SIZE, shuffle=False):
            with self._autocast():
                chunks.append(self.model.features(to_device(inputs.batch(indices), self.device)).float())
            self._check_cancel()
        self.reporter.event(f"Computed backbone features for {len(inputs)} examples")
        return torch.cat(chunks) if chunks else torch.empty(0, self.model.feature_dim, device=self.device)

    # ------------------------------------------------------------------ training

    def _autocast(self) -> Any:
        if self.amp_dtype is None:
            return torch.autocast(device_type="cpu", enabled=False)
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def _check_cancel(self) -> None:
        if self.reporter.should_stop():
            raise JobCancelled()

    def _logits(self, indices: list[int], *, train: bool) -> Tensor:
        if self.config.method == "linear_probe":
            features = self.train_features if train else self.val_features
            assert features is not None
            return self.model.classify(features[torch.as_tensor(indices, device=features.device)])
        inputs = self.train_inputs if train else self.val_inputs
        assert inputs is not None
        return self.model(to_device(inputs.batch(indices), self.device))

    def _set_train_mode(self) -> None:
        self.model.train()
        if self.config.method == "linear_probe":
            self.model.backbone.eval()

    def train_epoch(self, epoch: int) -> float:
        self._set_train_mode()
        total, count = 0.0, 0
        labels = self.train_labels.to(self.device)
        for indices in batches(
            len(self.train_inputs), self.hp.batch_size, shuffle=True, generator=self.generator
        ):
            with self._autocast():
                logits = self._logits(indices, train=True)
            target = labels[torch.as_tensor(indices, device=self.device)]
            loss = F.cross_entropy(logits.float(), target)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(
                [p for p in self.model.parameters() if p.requires_grad], self.hp.max_grad_norm
            )
            self.optimizer.step()
            self.scheduler.step()
            self.step += 1
            total += float(loss.detach()) * len(indices)
            count += len(indices)
            self.reporter.progress(
                epoch=epoch, epochs=self.hp.epochs, step=self.step, total_steps=self.total_steps
            )
            self._check_cancel()
        return total / max(count, 1)

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        if self.val_inputs is None or self.val_labels is None or len(self.val_inputs) == 0:
            return {}
        self.model.eval()
        labels = self.val_labels.to(self.device)
        loss_sum, correct = 0.0, 0
        for indices in batches(len(self.val_inputs), FEATURE_BATCH_SIZE, shuffle=False):
            with self._autocast():
                logits = self._logits(indices, train=False).float()
            target = labels[torch.as_tensor(indices, device=self.device)]
            loss_sum += float(F.cross_entropy(logits, target, reduction="sum"))
            correct += int((logits.argmax(dim=1) == target).sum())
        n = len(self.val_inputs)
        return {"val_loss": loss_sum / n, "val_accuracy": correct / n}

    def trainable_state(self) -> dict[str, Tensor]:
        """What a checkpoint holds: the tensors this method trains (the head alone for linear_probe)."""
        if self.config.method == "linear_probe":
            assert self.model.head is not None
            return {f"head.{name}": t for name, t in self.model.head.state_dict().items()}
        return self.model.state_dict()

    def train(self) -> FinetuneResult:
        history: list[dict[str, float]] = []
        metrics: dict[str, float] = {}
        self.reporter.progress(epoch=0, epochs=self.hp.epochs, step=0, total_steps=self.total_steps)
        for epoch in range(1, self.hp.epochs + 1):
            started = time.perf_counter()
            train_loss = self.train_epoch(epoch)
            metrics = {"epoch": float(epoch), "train_loss": train_loss, **self.evaluate()}
            metrics["epoch_seconds"] = time.perf_counter() - started
            history.append(metrics)
            self.reporter.metrics(epoch=epoch, step=self.step, values=metrics)
            self.reporter.checkpoint(
                epoch=epoch, step=self.step, tensors=self.trainable_state(), spec=self.spec, metrics=metrics
            )
        final = {k: v for k, v in metrics.items() if k not in ("epoch", "epoch_seconds")}
        return FinetuneResult(
            spec=self.spec,
            state=self.model.state_dict(),
            metrics=final,
            history=history,
            num_parameters=count_parameters(self.model),
            transfer=self.transfer,
        )

    def run(self) -> FinetuneResult:
        self.setup()
        return self.train()
