"""Semi-supervised fine-tuning: a few labels plus many unlabelled examples of the same domain.

The fine-tuning loop, with a second loss on a batch of unlabelled examples drawn beside every labelled
batch (`unlabeled_ratio` times its size): the model's confident predictions on a weak view become the
targets of a strong view of the same examples (FixMatch, Sohn et al., 2020), only where the prediction's
probability passes `confidence_threshold`. The views:

- images: weak = the light augmentation (crop, shift, small rotation), strong = the strong augmentation plus
  a random erased patch (cutout);
- text and tables trained in full: weak = the model in eval mode (no dropout), strong = the model in
  training mode (dropout) and, for a table, Gaussian noise on every column (TABLE_NOISE of its spread);
- a linear probe (frozen backbone, cached features): weak = the features as they are, strong = the
  features with Gaussian noise and the head's dropout.

The unlabelled loss ramps up with the usual 2 / (1 + exp(-10 p)) - 1 over the run's progress p, so the
first predictions, from a model that has seen few labels, do not teach it their mistakes. The unlabelled
dataset's labels, if it has any, are never read.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from graft.sources import DatasetSource
from ml import methods
from ml.alignment import dann_weight
from ml.augment import ImageAugmenter
from ml.data import draw, load_inputs
from ml.networks import column_statistics
from ml.runtime import to_device
from workers.recipes.finetune import FinetuneConfig, FinetuneRecipe

FEATURE_NOISE = 0.5  # standard deviations of each feature column, for the linear probe's strong view
TABLE_NOISE = 0.2  # and of each input column, for a table's


class SemiSupervisedConfig(FinetuneConfig):
    unlabeled: DatasetSource
    unlabeled_weight: float = Field(default=1.0, ge=0)
    confidence_threshold: float = Field(default=0.95, gt=0, lt=1)
    unlabeled_ratio: int = Field(default=3, ge=1, le=16)


class StrongImageAugmenter(nn.Module):
    """The strong augmentation, then a random erased patch of 2-15% of the image (cutout)."""

    def __init__(self, input_spec: dict[str, Any]) -> None:
        super().__init__()
        import kornia.augmentation as K

        self.base = ImageAugmenter("strong", input_spec)
        self.erase = K.RandomErasing(scale=(0.02, 0.15), ratio=(0.5, 2.0), value=0.0, p=1.0)

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        return self.erase(self.base(images).float()).to(images.dtype)


class SemiSupervisedRecipe(FinetuneRecipe):
    config: SemiSupervisedConfig

    def setup(self) -> None:
        super().setup()
        # Only the unlabelled examples' inputs: labels, if the dataset has any, are dropped here.
        self.unlabeled_inputs, _ = load_inputs(self.config.unlabeled, self.spec)
        self._queue: list[int] = []
        self.unlabeled_features: Tensor | None = None
        self.weak: nn.Module | None = None
        self.strong: nn.Module | None = None
        if self.config.method == "linear_probe":
            self.unlabeled_features = self._features(self.unlabeled_inputs, self.config.unlabeled)
            self.feature_scale = self.train_features.float().std(dim=0, unbiased=False)
        elif self.spec.modality == "image":
            self.weak = (self.augmenter or ImageAugmenter("light", self.spec.input_spec)).to(self.device)
            self.strong = StrongImageAugmenter(dict(self.spec.input_spec)).to(self.device)
        elif self.spec.modality == "tabular":
            rows = self.unlabeled_inputs.batch(range(len(self.unlabeled_inputs)))
            self.column_scale = column_statistics(rows)[1].to(self.device)
        self.pseudo_seen = self.pseudo_kept = 0
        self.reporter.event(
            f"Semi-supervised: {len(self.unlabeled_inputs)} unlabelled examples of {self.config.unlabeled.id}, "
            f"{self.config.unlabeled_ratio} per labelled one in each step; confident predictions (probability "
            f"at least {self.config.confidence_threshold:g}) on a weak view teach a strong view",
            data={"unlabeled_examples": len(self.unlabeled_inputs)},
        )

    def resume_extras(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        return {}, {"unlabeled_queue": self._queue}

    def restore_extras(self, tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
        self._queue = list(meta["unlabeled_queue"])

    def _unlabeled_batch(self, size: int) -> list[int]:
        taken, self._queue = draw(self._queue, size, len(self.unlabeled_inputs), self.generator)
        return taken

    def _views(self, indices: list[int]) -> tuple[Tensor, Tensor]:
        """(logits of the weak view, without gradient; logits of the strong view)."""
        if self.unlabeled_features is not None:
            rows = self.unlabeled_features[torch.as_tensor(indices, device=self.unlabeled_features.device)]
            with torch.no_grad():
                self.model.eval()
                weak = self.model.classify(self.model.adapt(rows))
                self.model.train()
                self.model.backbone.eval()
            scale = self.feature_scale.to(rows.device)
            noisy = rows + torch.randn(rows.shape, device=rows.device) * scale * FEATURE_NOISE
            return weak, self.model.classify(self.model.adapt(noisy))
        batch = to_device(self.unlabeled_inputs.batch(indices), self.device)
        if self.weak is not None and self.strong is not None:
            with torch.no_grad():
                weak = self.model(self.weak(batch))
            return weak, self.model(self.strong(batch))
        with torch.no_grad():
            self.model.eval()
            weak = self.model(batch)
            self.model.train()
            methods.freeze_norm_statistics(self.model, all_norms=bool(self.hp.freeze_batch_norm))
        if self.spec.modality == "tabular":  # the strong view: the row with noise, per column's spread
            batch = batch + torch.randn(batch.shape, device=batch.device) * self.column_scale * TABLE_NOISE
        return weak, self.model(batch)

    def extra_loss(self, features: Tensor, progress: float) -> Tensor | None:
        weight = self.config.unlabeled_weight * dann_weight(progress)
        if weight == 0:
            return None
        indices = self._unlabeled_batch(len(features) * self.config.unlabeled_ratio)
        weak, strong = self._views(indices)
        probabilities = F.softmax(weak.float(), dim=1)
        confidence, pseudo = probabilities.max(dim=1)
        mask = (confidence >= self.config.confidence_threshold).float()
        self.pseudo_seen += len(mask)
        self.pseudo_kept += int(mask.sum())
        loss = (F.cross_entropy(strong.float(), pseudo, reduction="none") * mask).mean()
        return weight * loss

    def train_epoch(self, epoch: int) -> tuple[float, float]:
        self.pseudo_seen = self.pseudo_kept = 0
        return super().train_epoch(epoch)

    def evaluate(self) -> dict[str, float]:
        """The validation metrics, and the share of the epoch's unlabelled examples confident enough to
        train on (`pseudo_label_share`)."""
        metrics = super().evaluate()
        if self.pseudo_seen:
            metrics["pseudo_label_share"] = self.pseudo_kept / self.pseudo_seen
        return metrics
