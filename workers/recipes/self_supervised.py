"""Self-supervised pretraining: continue training an upstream backbone on unlabelled data, so that a later
fine-tune starts from features of the target's domain.

- Images: contrastive learning (SimCLR, Chen et al. 2020): two augmented views of each image (random
  resized crop, flip, brightness and contrast jitter, noise), a projection head, the NT-Xent loss.
- Text (minilm-l6): unsupervised SimCSE (Gao et al. 2021): each sentence encoded twice with dropout
  on, the two encodings as the positive pair, NT-Xent over the batch.
- Tables (mlp): a denoising autoencoder: a share of each row's values swapped for another row's
  ("swap noise"), a decoder reconstructing the clean (standardised) row from the backbone's features.

Labels, where a dataset has them, are never read. The result is a backbone with no head, registered as a
pretrained upstream model; the projection head and decoder are dropped.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from graft.jobspec import Hyperparameters
from graft.sources import BaseModelSource, DatasetSource
from ml.data import batches, load_inputs
from ml.networks import TransferModel, column_statistics, count_parameters
from ml.resume import (
    Journal,
    TrainingState,
)
from ml.runtime import (
    RecipeConfig,
    Reporter,
    load_upstream_for,
    mlp_from_scratch,
    pick_device,
    seed_everything,
    to_device,
)
from ml.training import (
    MODEL,
    Loop,
    MixedPrecision,
    after_step,
    finite_loss,
    optimizer_and_schedule,
    run_recipe,
)
from workers.recipes.finetune import FinetuneResult

PROJECTION_DIM = 128
TEMPERATURE = {"image": 0.2, "text": 0.05}
SWAP_NOISE = 0.3
AUXILIARY = "auxiliary"  # the training state's name for the projection head or the decoder


class SelfSupervisedConfig(RecipeConfig):
    base: BaseModelSource
    train: DatasetSource
    hyperparameters: Hyperparameters
    save_checkpoints: bool = True


def nt_xent(a: Tensor, b: Tensor, temperature: float) -> Tensor:
    """Normalised temperature-scaled cross-entropy: each row of `a` must pick its own row of `b` (and
    vice versa) among all 2N - 1 others."""
    z = F.normalize(torch.cat([a, b]).float(), dim=1)
    similarity = z @ z.T / temperature
    n = len(a)
    similarity.fill_diagonal_(float("-inf"))
    targets = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(similarity, targets)


def augment_images(images: Tensor, generator: torch.Generator) -> Tensor:
    """A random view of each image (already normalised, N x C x H x W): resized crop of 50-100% of the
    area, horizontal flip, brightness and contrast jitter, a little noise."""
    n, _, h, w = images.shape
    views = []
    for i in range(n):
        scale = 0.5 + 0.5 * float(torch.rand(1, generator=generator))
        ch, cw = max(8, int(h * math.sqrt(scale))), max(8, int(w * math.sqrt(scale)))
        top = int(torch.randint(0, h - ch + 1, (1,), generator=generator))
        left = int(torch.randint(0, w - cw + 1, (1,), generator=generator))
        crop = images[i : i + 1, :, top : top + ch, left : left + cw]
        view = F.interpolate(crop, size=(h, w), mode="bilinear", align_corners=False)
        if float(torch.rand(1, generator=generator)) < 0.5:
            view = view.flip(-1)
        views.append(view)
    out = torch.cat(views)
    brightness = (torch.rand(n, 1, 1, 1, generator=generator) - 0.5) * 0.8
    contrast = 1 + (torch.rand(n, 1, 1, 1, generator=generator) - 0.5) * 0.8
    mean = out.mean(dim=(1, 2, 3), keepdim=True)
    out = (out - mean) * contrast + mean + brightness
    return out + 0.05 * torch.randn(out.shape, generator=generator)


def swap_noise(rows: Tensor, pool: Tensor, share: float, generator: torch.Generator) -> Tensor:
    """Each value replaced, with probability `share`, by the same column's value in a random row of `pool`."""
    mask = torch.rand(rows.shape, generator=generator) < share
    donors = pool[torch.randint(0, len(pool), (rows.shape[0],), generator=generator)]
    return torch.where(mask, donors, rows)


class SelfSupervisedRecipe:
    def __init__(self, config: SelfSupervisedConfig, reporter: Reporter) -> None:
        self.config = config
        self.reporter = reporter
        self.hp = config.hyperparameters
        self.device = pick_device(config.device)
        self.precision = MixedPrecision(self.device)
        self.journal: Journal | None = reporter.journal

    def setup(self) -> None:
        config = self.config
        self.generator = seed_everything(config.seed)
        upstream, spec = load_upstream_for(config.base, config.train)
        # A bare backbone: the upstream model of later jobs (a feature adapter, if the base had one, stays
        # behind: the backbone it was fitted over is about to change).
        options = {k: v for k, v in spec.options.items() if k != "adapter"}
        self.spec = spec.model_copy(update={"classes": [], "options": options})
        self.model = TransferModel(upstream.backbone, num_classes=0)
        self.modality = spec.modality
        self.inputs, _ = load_inputs(config.train, spec)  # labels, if any, are not used
        if self.modality == "tabular":
            rows = self.inputs.batch(range(len(self.inputs)))
            if mlp_from_scratch(config.base):
                self.model.backbone.set_input_statistics(*column_statistics(rows))  # type: ignore[operator]
            self.rows = rows
            self.auxiliary: nn.Module = nn.Linear(self.model.feature_dim, rows.shape[1])
        else:
            width = self.model.feature_dim
            self.auxiliary = nn.Sequential(
                nn.Linear(width, width), nn.ReLU(), nn.Linear(width, PROJECTION_DIM)
            )
        self.model.to(self.device)
        self.auxiliary.to(self.device)
        parameters = [p for p in self.model.parameters() if p.requires_grad] + list(
            self.auxiliary.parameters()
        )
        # A contrastive batch needs at least two examples; the last, smaller batch is dropped.
        self.batch_size = min(self.hp.batch_size, len(self.inputs))
        self.steps_per_epoch = max(1, len(self.inputs) // self.batch_size)
        self.total_steps = self.steps_per_epoch * self.hp.epochs
        self.optimizer, self.scheduler = optimizer_and_schedule(
            parameters,
            learning_rate=self.hp.learning_rate,
            weight_decay=self.hp.weight_decay,
            total_steps=self.total_steps,
            warmup_ratio=self.hp.warmup_ratio,
        )
        self.loop = Loop(self.optimizer, self.scheduler, self.precision, self.generator)
        self.step = 0
        self.history: list[dict[str, float]] = []
        objective = {
            "image": "contrastive (SimCLR: two augmented views, NT-Xent)",
            "text": "contrastive (SimCSE: two dropout views, NT-Xent)",
            "tabular": "denoising autoencoder (swap noise)",
        }[self.modality]
        self.reporter.event(
            f"Self-supervised pretraining of {config.base.id} on {len(self.inputs)} examples of {config.train.id}: "
            f"{objective}; {count_parameters(self.model):,} parameters",
            data={
                "objective": objective,
                "examples": len(self.inputs),
                "device": self.device.type,
                "hyperparameters": self.hp.model_dump(mode="json"),
            },
        )

    def _autocast(self) -> Any:
        return self.precision.autocast()

    def loss(self, indices: list[int]) -> Tensor:
        if self.modality == "image":
            images = self.inputs.batch(indices)
            a = augment_images(images, self.generator).to(self.device)
            b = augment_images(images, self.generator).to(self.device)
            with self._autocast():
                za = self.auxiliary(self.model.features(a))
                zb = self.auxiliary(self.model.features(b))
            return nt_xent(za, zb, TEMPERATURE["image"])
        if self.modality == "text":
            batch = to_device(self.inputs.batch(indices), self.device)
            with self._autocast():  # dropout differs between the two passes: the two views
                za = self.auxiliary(self.model.features(batch))
                zb = self.auxiliary(self.model.features(batch))
            return nt_xent(za, zb, TEMPERATURE["text"])
        clean = self.rows[torch.as_tensor(indices)]
        noisy = swap_noise(clean, self.rows, SWAP_NOISE, self.generator).to(self.device)
        backbone = self.model.backbone
        target = ((clean.to(self.device) - backbone.input_mean) / backbone.input_std).float()  # type: ignore[operator]
        with self._autocast():
            reconstruction = self.auxiliary(self.model.features(noisy))
        return F.mse_loss(reconstruction.float(), target)

    def _save_state(self, epoch: int) -> None:
        """At an epoch's end: what the next attempt needs to go on from here (as fine-tuning runs do)."""
        if self.journal is None:
            return
        state = self.loop.state(
            self.model.state_dict(),
            epoch=epoch,
            batch=0,
            step=self.step,
            complete=epoch >= self.hp.epochs,
            history=self.history,
        )
        state.put(AUXILIARY, self.auxiliary.state_dict())
        self.journal.save(state)

    def restore(self, state: TrainingState) -> None:
        self.model.load_state_dict(state.group(MODEL))
        self.auxiliary.load_state_dict(state.group(AUXILIARY))
        self.loop.restore(state)
        self.step = state.step
        self.history = [dict(h) for h in state.meta["history"]]
        self.reporter.event(
            f"Resumed from the training state saved after epoch {state.epoch} (step {state.step})",
            data={"epoch": state.epoch, "batch": 0, "step": state.step, "resumed": True},
        )

    def run(self) -> FinetuneResult:
        result: FinetuneResult = run_recipe(self)
        return result

    def train(self) -> FinetuneResult:
        history = self.history
        if not history:
            self.reporter.progress(epoch=0, epochs=self.hp.epochs, step=0, total_steps=self.total_steps)
        parameters = [p for group in self.optimizer.param_groups for p in group["params"]]
        for epoch in range(len(history) + 1, self.hp.epochs + 1):
            started = time.perf_counter()
            self.model.train()
            self.auxiliary.train()
            losses = []
            for indices in batches(len(self.inputs), self.batch_size, shuffle=True, generator=self.generator):
                if len(indices) < self.batch_size:
                    continue
                loss = self.loss(indices)
                value = finite_loss(loss, self.reporter, epoch=epoch, step=self.step + 1)
                self.precision.step(loss, self.optimizer, [parameters], self.hp.max_grad_norm, self.scheduler)
                self.step += 1
                losses.append(value)
                # A worker shutting down: the next attempt resumes from the last epoch's end.
                after_step(
                    self.reporter,
                    epoch=epoch,
                    epochs=self.hp.epochs,
                    step=self.step,
                    total_steps=self.total_steps,
                )
            metrics = {
                "epoch": float(epoch),
                "train_loss": sum(losses) / max(len(losses), 1),
                "epoch_seconds": time.perf_counter() - started,
            }
            history.append(metrics)
            self.reporter.metrics(epoch=epoch, step=self.step, values=metrics)
            if self.config.save_checkpoints:
                self.reporter.checkpoint(
                    epoch=epoch,
                    step=self.step,
                    tensors=self.model.state_dict(),
                    spec=self.spec,
                    metrics=metrics,
                    metadata={"method": "full", "objective": self.modality},
                    best=True,
                )
            self._save_state(epoch)
        state = {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}
        return FinetuneResult(
            spec=self.spec,
            state=state,
            metrics={k: v for k, v in history[-1].items() if k != "epoch_seconds"},
            history=history,
            num_parameters=count_parameters(self.model),
            transfer=None,
            best_epoch=len(history),
        )
