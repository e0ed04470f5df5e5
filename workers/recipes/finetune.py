"""One training run: transfer an upstream model to a labelled dataset (or train an architecture from
scratch, for pretraining and for the from-scratch baseline).

Setup: the upstream network, a head for the dataset's classes (kept when the label set is the source
head's: domain transfer; new otherwise: task transfer; classes matched by name), the method's trainable
weights and learning rates, the data split. Each epoch: AdamW with linear warm-up then cosine decay,
gradient clipping, mixed precision on CUDA, metrics, a checkpoint. The best epoch (by the monitored
metric) gives the result; early stopping ends the run when that metric stops improving.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from graft.defaults import HEAD_WARMUP_LEARNING_RATE, MIN_VALIDATION_PER_CLASS
from graft.jobspec import EarlyStopping, Hyperparameters
from graft.sources import BaseModelSource, DatasetSource
from graft.spec import ModelSpec
from ml import methods
from ml.augment import ImageAugmenter, augmenter_for
from ml.data import Inputs, Subset, batches, label_indices, load_inputs, stratified_split
from ml.features import FEATURE_BATCH_SIZE, FeatureCache, extract_features, feature_key
from ml.metrics import classification_metrics
from ml.networks import FeatureAdapter, TransferModel, column_statistics, count_parameters
from ml.norms import BN_SHIFT_THRESHOLD, gaussian_shift, norm_shift, reestimate_norms
from ml.resume import (
    Journal,
    TrainingState,
    restore_rng,
)
from ml.runtime import (
    RecipeConfig,
    Reporter,
    load_upstream_for,
    mlp_from_scratch,
    pick_device,
    seed_everything,
    stop_signal,
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

# Choosing the best epoch on validation data needs this many validation examples per class on average;
# with fewer, one example moves accuracy by points and the choice is noise: the last epoch of the
# schedule (warm-up then cosine decay to zero, which converges) is the result.
MIN_SELECTION_EXAMPLES_PER_CLASS = MIN_VALIDATION_PER_CLASS
Method = Literal["full", "linear_probe", "partial", "lora"]


class FinetuneConfig(RecipeConfig):
    method: Method
    base: BaseModelSource
    train: DatasetSource
    validation: DatasetSource | None = None
    hyperparameters: Hyperparameters
    head: Literal["new", "keep"] | None = None
    feature_cache_dir: Any = None  # a Path; None disables the persistent cache
    save_checkpoints: bool = True
    # The result is the last epoch, not the best on validation data (domain adaptation: the validation
    # data are the source's, whose best epoch comes before adaptation has done its work).
    keep_last_epoch: bool = False
    # The model's output classes; by default the training data's (a distillation student: the teacher's).
    classes: list[str] | None = None
    # Labelled data never trained on: the result is measured on it after training.
    evaluation: DatasetSource | None = None
    # Explicit (training, validation) positions into the training data, instead of the seeded split: one
    # fold of a cross-validation.
    split: tuple[list[int], list[int]] | None = None
    # With method linear_probe: a feature adapter of this hidden width trains with the head over the frozen
    # backbone's (cached) features.
    adapter: int | None = Field(default=None, ge=1, le=4096)


@dataclass
class FinetuneResult:
    spec: ModelSpec
    state: dict[str, Tensor]
    metrics: dict[str, float]
    history: list[dict[str, float]] = field(default_factory=list)
    num_parameters: int = 0
    transfer: dict[str, Any] | None = field(default_factory=dict)  # None: no head (self-supervised)
    evaluation: dict[str, Any] | None = None
    best_epoch: int = 0
    stopped_early: bool = False
    adapter: dict[str, Tensor] | None = None
    adapter_config: dict[str, Any] | None = None
    # Per validation example, in the order of `validation_positions` (into the training data): 1 when the
    # result model classifies it right.
    validation_correct: list[int] = field(default_factory=list)
    validation_positions: list[int] = field(default_factory=list)
    # The result model on the evaluation dataset: its metrics and, per example, whether it was right.
    held_out: dict[str, Any] | None = None


def monitored(metrics: dict[str, float], stopping: EarlyStopping | None) -> tuple[float, float]:
    """A score to maximise: the early-stopping metric, else validation accuracy with lower loss as the
    tie-break."""
    if stopping is not None and stopping.metric == "val_loss":
        return (-metrics["val_loss"], 0.0)
    return (metrics["val_accuracy"], -metrics["val_loss"])


class FinetuneRecipe:
    augmenter: ImageAugmenter | None = None
    adapted_norms = False
    fresh_adapter = False
    val_positions: Sequence[int] = ()

    def __init__(self, config: FinetuneConfig, reporter: Reporter) -> None:
        self.config = config
        self.reporter = reporter
        self.hp = config.hyperparameters
        self.device = pick_device(config.device)
        self.precision = MixedPrecision(self.device)
        self.amp_dtype = self.precision.dtype
        self.step = 0
        # Where the run stands; saved to, and restored from, the journal (when the reporter keeps one).
        self.journal: Journal | None = reporter.journal
        self.history: list[dict[str, float]] = []
        self.best_score: tuple[float, float] | None = None
        self.best_epoch, self.stale = 0, 0
        self.best_state: dict[str, Tensor] = {}
        self.stopped_early = False
        self.done = False
        self._resume_epoch: TrainingState | None = None
        self.epoch_generator_state: Tensor | None = None

    # ------------------------------------------------------------------ setup

    def setup(self) -> None:
        config = self.config
        self.generator = seed_everything(config.seed)
        self.classes = list(config.classes or config.train.classes)
        self.spec, self.model, self.transfer = self._build_model()
        self.reporter.event(
            f"Loaded {config.base.id}: {self.transfer['kind']} transfer, {self.transfer['head']} head, "
            f"{config.method} on {self.device.type}",
            data={
                "transfer": self.transfer,
                "device": self.device.type,
                "method": config.method,
                # What this run trains with: its arm's in the job's plan.
                "hyperparameters": self.hp.model_dump(mode="json"),
            },
        )
        self._load_data()
        if self.mlp_from_scratch:
            rows = self.train_inputs.batch(range(len(self.train_inputs)))
            self.model.backbone.set_input_statistics(*column_statistics(rows))  # type: ignore[operator]

        self.model.to(self.device)
        if self.device.type == "cuda" and self.spec.modality == "image":
            self.model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        self._feature_memo: dict[int, Tensor] = {}
        self.adapted_norms = False
        if self._learned_weights:
            self._adapt_norm_statistics()
        warmup_epochs = self.hp.head_warmup_epochs or 0
        if config.method != "linear_probe" and warmup_epochs and self._learned_weights:
            # A new head is fitted before the backbone moves (LP-FT); a kept head too, from where it stands:
            # features of another domain (or re-estimated statistics) may have left it far off.
            self._warm_up_head(warmup_epochs)
        policy, self.augmenter = augmenter_for(
            self.hp.augmentation,
            self.spec.modality,
            config.method,
            len(self.train_inputs),
            self.hp.epochs * math.ceil(len(self.train_inputs) / self.hp.batch_size),
            self.spec.input_spec,
        )
        if self.augmenter is not None:
            self.augmenter.to(self.device)
            self.reporter.event(
                f"Augmenting training images ({policy}: resized crops, shifts, rotations"
                + (
                    ", colour jitter"
                    if int(self.spec.input_spec.get("channels", 3)) == 3
                    else ", brightness and contrast"
                )
                + "; no flips)",
                data={"augmentation": policy},
            )
        self.setup_method = methods.configure(self.model, config.method, self.hp.model_dump())
        if config.method == "linear_probe":
            self.train_features = self._features(self.train_inputs, config.train)
            self.val_features = (
                self._features(self.val_inputs, self.val_source) if self.val_inputs is not None else None
            )
            if self.fresh_adapter:
                self.set_adapter_statistics(self.train_features)

        self.steps_per_epoch = math.ceil(len(self.train_inputs) / self.hp.batch_size)
        self.total_steps = self.steps_per_epoch * self.hp.epochs
        self.optimizer, self.scheduler = optimizer_and_schedule(
            self.setup_method.param_groups + self.extra_parameters(),
            weight_decay=self.hp.weight_decay,
            total_steps=self.total_steps,
            warmup_ratio=self.hp.warmup_ratio,
        )
        self.loop = Loop(self.optimizer, self.scheduler, self.precision, self.generator)
        trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        self.reporter.event(
            f"Training {trainable:,} of {count_parameters(self.model):,} parameters",
            data={"trainable_parameters": trainable, "lora": self.setup_method.lora},
        )

    @torch.no_grad()
    def set_adapter_statistics(self, features: Tensor) -> None:
        """A new feature adapter standardises features with the statistics of the data it serves."""
        adapter = self.model.adapter
        assert adapter is not None
        adapter.mean.copy_(features.mean(dim=0))
        adapter.std.copy_(features.std(dim=0, unbiased=False).clamp_min(1e-4))

    @property
    def _learned_weights(self) -> bool:
        return self.config.base.learned

    def _warm_up_head(self, epochs: int) -> None:
        """Fit the head on the frozen backbone's features before the backbone moves (LP-FT): a random
        head's first gradients would otherwise disturb pretrained features, and few steps would be spent
        learning what a linear probe learns in seconds. A kept head starts from its source weights and is
        checked: its accuracy on the training data before and after is reported."""
        assert self.model.head is not None
        with torch.no_grad():
            features = self.model.adapt(self._features(self.train_inputs, self.config.train))
        labels = self.train_labels.to(self.device)
        kept = self.transfer["head"] == "keep"
        before = self._head_accuracy(features, labels) if kept else None
        rate = self.hp.head_warmup_learning_rate or HEAD_WARMUP_LEARNING_RATE
        optimizer = torch.optim.AdamW(
            self.model.head.parameters(), lr=rate, weight_decay=self.hp.weight_decay
        )
        self.model.head.train()
        step = 0
        for warmup_epoch in range(1, epochs + 1):
            for indices in batches(len(features), self.hp.batch_size, shuffle=True, generator=self.generator):
                index = torch.as_tensor(indices, device=self.device)
                loss = F.cross_entropy(self.model.classify(features[index]), labels[index])
                step += 1
                finite_loss(loss, self.reporter, epoch=warmup_epoch, step=step, phase="head warm-up ")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            self._check_cancel()
        self._feature_memo.clear()  # the backbone is about to change: these features are only for the warm-up
        if kept:
            after = self._head_accuracy(features, labels)
            self.reporter.event(
                f"Checked the kept head on frozen features before fine-tuning: training accuracy "
                f"{before:.3f} as kept, {after:.3f} after {epochs} epochs of fitting it",
                data={
                    "head_warmup_epochs": epochs,
                    "kept_head_accuracy": before,
                    "fitted_head_accuracy": after,
                },
            )
            return
        self.reporter.event(
            f"Fitted the new head on frozen features for {epochs} epochs before fine-tuning",
            data={"head_warmup_epochs": epochs},
        )

    @torch.no_grad()
    def _head_accuracy(self, features: Tensor, labels: Tensor) -> float:
        assert self.model.head is not None
        self.model.head.eval()
        accuracy = float((self.model.head(features).argmax(dim=1) == labels).float().mean())
        self.model.head.train()
        return accuracy

    def _adapt_input_statistics(self) -> None:
        """The mlp's normalisation is its input standardisation: under the same rule as AdaBN, the
        columns' mean and standard deviation are re-estimated on the training data when they differ from
        the stored ones (the same shift score, per column)."""
        choice = self.hp.batch_norm_statistics
        if (
            choice == "source"
            or (choice == "auto" and self.config.method != "full")
            or len(self.train_inputs) < 2
        ):
            return
        backbone = self.model.backbone
        mean, std = column_statistics(self.train_inputs.batch(range(len(self.train_inputs))))
        shift = gaussian_shift(backbone.input_mean.cpu(), backbone.input_std.cpu(), mean, std)  # type: ignore[union-attr, arg-type]
        if choice == "auto" and shift < BN_SHIFT_THRESHOLD:
            self.reporter.event(
                f"Kept the input standardisation of the upstream weights (shift score {shift:.3f})",
                data={"batch_norm_shift": shift, "batch_norm_statistics": "source"},
            )
            return
        backbone.set_input_statistics(mean.to(self.device), std.to(self.device))  # type: ignore[operator]
        self.reporter.event(
            f"Re-estimated the input standardisation on the training data (shift score {shift:.3f})",
            data={"batch_norm_shift": shift, "batch_norm_statistics": "target"},
        )

    def _adapt_norm_statistics(self) -> None:
        """AdaBN (Li et al., 2016): batch-norm statistics re-estimated on the training data when they differ
        from the ones the weights carry (another domain: other pixels, another drawing style), so every
        layer normalises the target's activations, not the source's. `batch_norm_statistics` "target"
        always re-estimates, "source" never, "auto" for `full` fine-tuning when the shift score (the mean
        over batch norms and channels of the symmetric KL divergence between the stored and the data's
        Gaussian) passes BN_SHIFT_THRESHOLD. The methods that freeze part of the backbone (linear probe,
        partial, LoRA) keep the upstream's statistics under "auto", so a frozen part computes what it
        computed upstream: re-estimating ImageNet statistics from 100 digit images cost EfficientNet-Lite0's
        linear probe 13 points (0.843 -> 0.712 on 600 held-out digits)."""
        if hasattr(self.model.backbone, "set_input_statistics"):
            self._adapt_input_statistics()
            return
        norms = [m for m in self.model.backbone.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        choice = self.hp.batch_norm_statistics
        if not norms or choice == "source" or len(self.train_inputs) < 2:
            return
        if choice == "auto" and self.config.method != "full":
            return
        if not all(m.track_running_stats for m in norms):
            return
        shift = norm_shift(self.model, norms, self.train_inputs, self.device, self._check_cancel)
        if choice == "auto" and shift < BN_SHIFT_THRESHOLD:
            self.reporter.event(
                f"Kept the batch-norm statistics of the upstream weights (shift score {shift:.3f})",
                data={"batch_norm_shift": shift, "batch_norm_statistics": "source"},
            )
            return
        reestimate_norms(self.model, norms, self.train_inputs, self.device, self._check_cancel)
        self.adapted_norms = True
        self.reporter.event(
            f"Re-estimated {len(norms)} batch-norm layers' statistics on the training data (AdaBN; shift score "
            f"{shift:.3f})",
            data={"batch_norm_shift": shift, "batch_norm_statistics": "target"},
        )

    @property
    def mlp_from_scratch(self) -> bool:
        return mlp_from_scratch(self.config.base)

    def _build_model(self) -> tuple[ModelSpec, TransferModel, dict[str, Any]]:
        upstream, spec = load_upstream_for(self.config.base, self.config.train)
        source_classes = list(spec.classes)
        same_labels = bool(source_classes) and sorted(source_classes) == sorted(self.classes)
        keep = self.config.head == "keep" or (self.config.head is None and same_labels)
        target = spec.with_classes(self.classes)
        model = TransferModel(upstream.backbone, num_classes=len(self.classes))
        model.adapter = upstream.adapter  # an adapted upstream keeps its adapter (its spec names it)
        if self.config.adapter and model.adapter is None:
            # A frozen backbone with a trainable adapter over it (adapt and distill jobs, backbone "frozen").
            model.adapter = FeatureAdapter(model.feature_dim, self.config.adapter)
            self.fresh_adapter = True
            target = target.model_copy(update={"options": {**target.options, "adapter": self.config.adapter}})
        matched = [name for name in self.classes if name in source_classes]
        if keep and upstream.head is not None and model.head is not None:
            with torch.no_grad():
                for row, name in enumerate(self.classes):
                    if name in source_classes:
                        model.head.weight[row].copy_(upstream.head.weight[source_classes.index(name)])
                        model.head.bias[row].copy_(upstream.head.bias[source_classes.index(name)])
        transfer = {
            "kind": "domain" if same_labels else "task",
            "head": "keep" if keep and upstream.head is not None else "new",
            "source_classes": source_classes,
            "matched_classes": len(matched) if keep else 0,
        }
        return target, model, transfer

    def _load_data(self) -> None:
        config = self.config
        train_inputs, train_labels = load_inputs(config.train, self.spec)
        labels = self.training_labels(train_inputs, train_labels)
        self.val_source = config.validation or config.train
        if config.validation is not None:
            val_inputs, val_labels = load_inputs(config.validation, self.spec)
            assert val_labels is not None, "validation dataset must be labelled"
            self.train_inputs: Inputs = train_inputs
            self.train_positions = list(range(len(train_inputs)))
            self.train_labels = labels
            self.val_inputs: Inputs | None = val_inputs
            self.val_labels: Tensor | None = label_indices(val_labels, self.classes)
            self.val_positions = ()  # another dataset's: no positions in the training data
        else:
            if config.split is not None:
                train_idx, val_idx = list(config.split[0]), list(config.split[1])
            else:
                train_idx, val_idx = stratified_split(labels, self.hp.validation_split, config.seed)
            self.train_inputs = Subset(train_inputs, train_idx)
            self.train_positions = train_idx
            self.train_labels = labels[train_idx]
            self.val_inputs = Subset(train_inputs, val_idx) if val_idx else None
            self.val_labels = labels[val_idx] if val_idx else None
            self.val_positions = list(val_idx)
        n_val = len(self.val_inputs) if self.val_inputs is not None else 0
        self.reporter.event(
            f"Data: {len(self.train_inputs)} training and {n_val} validation examples, {len(self.classes)} classes",
            data={"train_examples": len(self.train_inputs), "validation_examples": n_val},
        )
        self.selection = self._selection(n_val)
        if n_val == 0:
            self.reporter.event("No validation data: the last epoch of the schedule is the result")
        elif self.selection == "last" and self.hp.model_selection == "auto":
            self.reporter.event(
                f"{n_val} validation examples for {len(self.classes)} classes are too few to choose an epoch "
                f"by (fewer than {MIN_SELECTION_EXAMPLES_PER_CLASS} per class): the last epoch of the schedule "
                "is the result",
                data={"model_selection": "last", "validation_examples": n_val},
            )

    def _selection(self, validation_examples: int) -> str:
        """ "best" (the epoch with the best validation score) or "last"."""
        if self.config.keep_last_epoch or validation_examples == 0:
            return "last"
        if self.hp.model_selection != "auto":
            return self.hp.model_selection
        if self.hp.early_stopping is not None:
            return "best"  # asked for: stopping and choosing on the validation data go together
        enough = validation_examples >= MIN_SELECTION_EXAMPLES_PER_CLASS * max(1, len(self.classes))
        return "best" if enough else "last"

    def training_labels(self, inputs: Inputs, labels: list[str] | None) -> Tensor:
        """Class indices of the training examples (a distillation student may take the teacher's)."""
        assert labels is not None, "training dataset must be labelled"
        return label_indices(labels, self.classes)

    # ------------------------------------------------------------------ features

    @torch.no_grad()
    def _extract(self, inputs: Inputs) -> Tensor:
        """Backbone features of every example of `inputs` (frozen backbone, eval mode)."""
        return extract_features(
            self.model, inputs, self.device, self.amp_dtype, on_batch=self._check_cancel, backbone_only=True
        )

    def _features(self, inputs: Inputs, source: DatasetSource) -> Tensor:
        """Features of a dataset's examples, through the persistent cache when the backbone is fixed."""
        whole, indices = (inputs.inputs, inputs.indices) if isinstance(inputs, Subset) else (inputs, None)
        if id(whole) not in self._feature_memo:
            self._feature_memo[id(whole)] = self._dataset_features(whole, source)
        features = self._feature_memo[id(whole)]
        return features if indices is None else features[torch.as_tensor(indices, device=features.device)]

    def _dataset_features(self, whole: Inputs, source: DatasetSource) -> Tensor:
        identity = self.config.base.identity()
        if self.model.adapter is not None:
            identity = {**identity, "features": "backbone"}  # before the adapter, unlike a ranking's
        if (
            self.config.feature_cache_dir is None
            or identity["origin"] is None
            or not source.sha256
            or self.adapted_norms  # statistics of this run's training data: not the upstream's features
        ):
            features = self._extract(whole)
            hit = False
        else:
            key = feature_key(
                identity, self.spec.input_spec, source.sha256, source.schema_info, self.amp_dtype
            )
            features, hit = FeatureCache(self.config.feature_cache_dir).get_or_compute(
                key, lambda: self._extract(whole).cpu()
            )
            features = features.to(self.device)
        verb = "Reused cached" if hit else "Computed"
        self.reporter.event(
            f"{verb} backbone features for {len(whole)} examples of {source.id}", data={"cache_hit": hit}
        )
        return features

    # ------------------------------------------------------------------ training

    def _autocast(self) -> Any:
        return self.precision.autocast()

    def _check_cancel(self) -> None:
        signal = stop_signal(self.reporter)
        if signal is not None:
            raise signal

    def _forward(self, indices: list[int], *, train: bool) -> tuple[Tensor, Tensor]:
        """(features, logits) of a batch of the training or validation data."""
        if self.config.method == "linear_probe":
            cached = self.train_features if train else self.val_features
            assert cached is not None
            features = self.model.adapt(cached[torch.as_tensor(indices, device=cached.device)])
        else:
            inputs = self.train_inputs if train else self.val_inputs
            assert inputs is not None
            batch = to_device(inputs.batch(indices), self.device)
            if train and self.augmenter is not None:
                batch = self.augmenter(batch)
            features = self.model.features(batch)
        return features, self.model.classify(features)

    def _logits(self, indices: list[int], *, train: bool) -> Tensor:
        return self._forward(indices, train=train)[1]

    def training_loss(self, logits: Tensor, target: Tensor, indices: list[int]) -> Tensor:
        """The loss of a batch of training examples (`indices` into the training data)."""
        return F.cross_entropy(logits, target)

    def extra_loss(self, features: Tensor, progress: float) -> Tensor | None:
        """A term added to the training loss of each batch (domain adaptation adds one); `progress` runs
        from 0 to 1 over the run."""
        return None

    def extra_parameters(self) -> list[dict[str, Any]]:
        """More parameter groups for the optimiser (a domain discriminator, say)."""
        return []

    def train_epoch(self, epoch: int) -> tuple[float, float]:
        """Mean training loss and accuracy of one pass over the training data."""
        self.model.train()
        methods.freeze_norm_statistics(self.model, all_norms=bool(self.hp.freeze_batch_norm))
        if self.config.method == "linear_probe":
            self.model.backbone.eval()
        loss_sum, correct, count = 0.0, 0, 0
        first_batch = 0
        resumed = self._resume_epoch
        if resumed is not None and resumed.epoch == epoch and resumed.batch > 0:
            # The epoch's order is drawn again from the generator state it was first drawn with; the batches
            # already trained are skipped and every generator continues from where it stood.
            self.epoch_generator_state = resumed.tensors["epoch_generator"]
            self.generator.set_state(self.epoch_generator_state)
            order = batches(
                len(self.train_inputs), self.hp.batch_size, shuffle=True, generator=self.generator
            )
            restore_rng(self.generator, resumed.group("rng"), resumed.meta["rng"])
            first_batch = resumed.batch
            loss_sum, correct, count = resumed.meta["partial"]
        else:
            self.epoch_generator_state = self.generator.get_state()
            order = batches(
                len(self.train_inputs), self.hp.batch_size, shuffle=True, generator=self.generator
            )
        self._resume_epoch = None
        labels = self.train_labels.to(self.device)
        # The model's trainable weights are clipped together; extra parameter groups (a domain discriminator)
        # are clipped on their own, so that their gradients never crowd out the model's.
        model_groups = len(self.setup_method.param_groups)
        trainable = [p for group in self.optimizer.param_groups[:model_groups] for p in group["params"]]
        extra_params = [p for group in self.optimizer.param_groups[model_groups:] for p in group["params"]]
        for position, indices in enumerate(order):
            if position < first_batch:
                continue
            with self._autocast():
                features, logits = self._forward(indices, train=True)
                extra = self.extra_loss(features, self.step / max(self.total_steps, 1))
            target = labels[torch.as_tensor(indices, device=self.device)]
            loss = self.training_loss(logits.float(), target, indices)
            if extra is not None:
                loss = loss + extra.float()
            value = finite_loss(loss, self.reporter, epoch=epoch, step=self.step + 1)
            self.precision.step(
                loss, self.optimizer, [trainable, extra_params], self.hp.max_grad_norm, self.scheduler
            )
            self.step += 1
            loss_sum += value * len(indices)
            correct += int((logits.detach().argmax(dim=1) == target).sum())
            count += len(indices)
            after_step(
                self.reporter,
                epoch=epoch,
                epochs=self.hp.epochs,
                step=self.step,
                total_steps=self.total_steps,
                check=position + 1 < len(order),  # after the last batch, the epoch's end saves the state
                on_preempt=partial(
                    self._save_state, epoch, batch=position + 1, partial=[loss_sum, correct, count]
                ),
            )
        return loss_sum / max(count, 1), correct / max(count, 1)

    @torch.no_grad()
    def _val_predictions(self) -> tuple[Tensor, Tensor] | None:
        """(logits, targets) on the validation data, in eval mode."""
        if self.val_inputs is None or self.val_labels is None or len(self.val_inputs) == 0:
            return None
        self.model.eval()
        chunks = []
        for indices in batches(len(self.val_inputs), FEATURE_BATCH_SIZE, shuffle=False):
            with self._autocast():
                chunks.append(self._logits(indices, train=False).float())
        return torch.cat(chunks), self.val_labels.to(self.device)

    def evaluate(self) -> dict[str, float]:
        predictions = self._val_predictions()
        if predictions is None:
            return {}
        logits, targets = predictions
        return {
            "val_loss": float(F.cross_entropy(logits, targets)),
            "val_accuracy": float((logits.argmax(dim=1) == targets).float().mean()),
        }

    def trained_tensors(self) -> dict[str, Tensor]:
        return methods.trained_tensors(self.model, self.config.method)

    def train(self) -> FinetuneResult:
        stopping = (
            self.hp.early_stopping if self.val_inputs is not None and self.selection == "best" else None
        )
        checkpoint_metadata: dict[str, str] = {"method": self.config.method}
        if self.setup_method.lora is not None:
            checkpoint_metadata.update(methods.lora_metadata(self.setup_method.lora))
        if not self.history:
            self.reporter.progress(epoch=0, epochs=self.hp.epochs, step=0, total_steps=self.total_steps)
        while not self.done and len(self.history) < self.hp.epochs:
            epoch = len(self.history) + 1
            started = time.perf_counter()
            train_loss, train_accuracy = self.train_epoch(epoch)
            metrics = {
                "epoch": float(epoch),
                "train_loss": train_loss,
                "train_accuracy": train_accuracy,
                **self.evaluate(),
            }
            metrics["epoch_seconds"] = time.perf_counter() - started
            self.history.append(metrics)
            tensors = self.trained_tensors()
            improved = True
            if "val_loss" in metrics and self.selection == "best":
                score = monitored(metrics, stopping)
                margin = stopping.min_delta if stopping is not None else 0.0
                best_score = self.best_score
                improved = (
                    best_score is None
                    or (score[0] > best_score[0] + margin)
                    or (margin == 0.0 and score[0] == best_score[0] and score[1] > best_score[1])
                )
            if improved:
                self.best_score = monitored(metrics, stopping) if "val_loss" in metrics else None
                self.best_epoch, self.stale = epoch, 0
                self.best_state = {k: v.detach().clone() for k, v in tensors.items()}
            else:
                self.stale += 1
            self.reporter.metrics(epoch=epoch, step=self.step, values=metrics)
            if self.config.save_checkpoints:
                self.reporter.checkpoint(
                    epoch=epoch,
                    step=self.step,
                    tensors=tensors,
                    spec=self.spec,
                    metrics=metrics,
                    metadata=checkpoint_metadata,
                    best=improved,
                )
            if stopping is not None and self.stale >= stopping.patience:
                self.stopped_early = epoch < self.hp.epochs
                self.done = True
                self.reporter.event(
                    f"Early stopping after epoch {epoch}: {stopping.metric} did not improve for {self.stale} "
                    f"epochs; the best epoch was {self.best_epoch}",
                    data={"best_epoch": self.best_epoch},
                )
            self._save_state(epoch)
        return self._finish(self.history, self.best_epoch, self.best_state, self.stopped_early)

    # ------------------------------------------------------------------ resuming

    def resume_extras(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """More state a subclass trains with (a domain discriminator, say): (tensors, JSON)."""
        return {}, {}

    def restore_extras(self, tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
        """Put back what `resume_extras` saved."""

    def _save_state(self, epoch: int, *, batch: int = 0, partial: list[float] | None = None) -> None:
        """Hand the journal everything needed to continue from here: at the end of an epoch (batch 0) or,
        when the worker is stopping, in the middle of one."""
        if self.journal is None:
            return
        state = self.loop.state(
            self.trained_tensors(),
            epoch=epoch,
            batch=batch,
            step=self.step,
            complete=self.done or (batch == 0 and epoch >= self.hp.epochs),
            history=self.history,
            best_epoch=self.best_epoch,
            best_score=list(self.best_score) if self.best_score is not None else None,
            stale=self.stale,
            stopped_early=self.stopped_early,
        )
        # At the end of an epoch that improved, the best weights are the model's: stored once.
        state.meta["best_is_model"] = batch == 0 and self.best_epoch == epoch
        if not state.meta["best_is_model"]:
            state.put("best", self.best_state)
        if batch > 0:
            assert self.epoch_generator_state is not None
            state.tensors["epoch_generator"] = self.epoch_generator_state
            state.meta["partial"] = partial
        extra_tensors, state.meta["extras"] = self.resume_extras()
        state.put("extras", extra_tensors)
        self.journal.save(state)

    def restore(self, state: TrainingState) -> None:
        """Continue from a saved state (called after setup, which rebuilt the model, data and optimiser)."""
        self.model.load_state_dict(state.group(MODEL), strict=False)
        self.loop.restore(state)
        self.restore_extras(state.group("extras"), state.meta["extras"])
        self.step = state.step
        self.history = [dict(h) for h in state.meta["history"]]
        self.best_epoch = int(state.meta["best_epoch"])
        score = state.meta["best_score"]
        self.best_score = (float(score[0]), float(score[1])) if score is not None else None
        self.stale = int(state.meta["stale"])
        self.stopped_early = bool(state.meta["stopped_early"])
        best = state.group(MODEL) if state.meta.get("best_is_model") else state.group("best")
        self.best_state = {k: v.to(self.device) for k, v in best.items()}
        self.done = state.complete
        if state.batch > 0:
            self._resume_epoch = state
        where = (
            "after its last epoch"
            if state.complete
            else (
                f"in epoch {state.epoch} after {state.batch} batches"
                if state.batch
                else f"after epoch {state.epoch}"
            )
        )
        self.reporter.event(
            f"Resumed from the training state saved {where} (step {state.step})",
            data={"epoch": state.epoch, "batch": state.batch, "step": state.step, "resumed": True},
        )

    def _finish(
        self,
        history: list[dict[str, float]],
        best_epoch: int,
        best_state: dict[str, Tensor],
        stopped_early: bool,
    ) -> FinetuneResult:
        self.model.load_state_dict(best_state, strict=False)
        evaluation = None
        correct: list[int] = []
        predictions = self._val_predictions()
        if predictions is not None:
            logits, targets = predictions
            evaluation = classification_metrics(targets, logits.argmax(dim=1), self.classes)
            correct = (logits.argmax(dim=1) == targets).int().tolist()
        held_out = self._held_out() if self.config.evaluation is not None else None
        adapter = adapter_config = None
        model = self.model
        if self.setup_method.peft_model is not None:
            adapter = {
                k: v.detach().cpu().clone()
                for k, v in methods.adapter_tensors(self.setup_method.peft_model, self.model).items()
            }
            adapter_config = self.setup_method.lora
            model = methods.merge_lora(self.setup_method.peft_model)
        best = history[best_epoch - 1]
        metrics = {k: v for k, v in best.items() if k != "epoch_seconds"}
        if evaluation is not None:
            metrics["val_macro_f1"] = evaluation["macro_f1"]
        if held_out is not None:
            metrics["eval_accuracy"] = held_out["accuracy"]
            metrics["eval_macro_f1"] = held_out["macro_f1"]
        return FinetuneResult(
            spec=self.spec,
            state=model.state_dict(),
            metrics=metrics,
            history=history,
            num_parameters=count_parameters(model),
            transfer=self.transfer,
            evaluation=evaluation,
            best_epoch=best_epoch,
            stopped_early=stopped_early,
            adapter=adapter,
            adapter_config=adapter_config,
            validation_correct=correct,
            validation_positions=list(self.val_positions),
            held_out=held_out,
        )

    @torch.no_grad()
    def _held_out(self) -> dict[str, Any]:
        """The result model (its weights as they stand, before a LoRA merge) on the evaluation dataset."""
        source = self.config.evaluation
        assert source is not None
        inputs, labels = load_inputs(source, self.spec)
        assert labels is not None, "the evaluation dataset must be labelled"
        targets = label_indices(labels, self.classes).to(self.device)
        self.model.eval()
        chunks = []
        for indices in batches(len(inputs), FEATURE_BATCH_SIZE, shuffle=False):
            self._check_cancel()
            with self._autocast():
                chunks.append(self.model(to_device(inputs.batch(indices), self.device)).float().argmax(dim=1))
        predicted = torch.cat(chunks)
        metrics = classification_metrics(targets, predicted, self.classes)
        return {
            "dataset": source.id,
            "examples": len(targets),
            "accuracy": metrics["accuracy"],
            "macro_f1": metrics["macro_f1"],
            "correct": (predicted == targets).int().tolist(),
        }

    def run(self) -> FinetuneResult:
        result: FinetuneResult = run_recipe(self)
        return result
