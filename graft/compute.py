"""What a network costs to run, estimated without running it: the forward FLOPs and the parameters of each
built-in architecture at its input size, and how fast the reference machine runs them. A job's plan
(graft/plan.py) is priced with these before the job is queued; bench/plan_cost.py measures the constants
below and checks the estimates against real runs (docs/reliability.md, "What a job may cost").

The reference machine is the one Graft's benchmarks run on: 2 CPU cores, PyTorch's CPU kernels. A GPU
worker runs the same job many times faster; the estimate is a bound on the work, stated in the time it
takes there, so that a limit means the same on every deployment.
"""

from __future__ import annotations

import itertools
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from graft.catalog import BUILTIN_MODELS
from graft.spec import ModelSpec

# MiniLM-L6 (BERT): hidden width, feed-forward width, vocabulary and positions.
MINILM_WIDTH, MINILM_FF, MINILM_VOCAB, MINILM_POSITIONS = 384, 1536, 30522, 512
# EfficientNet-Lite0's forward pass at 224 x 224 (0.39 G multiply-adds), in FLOPs; it scales with pixels.
EFFICIENTNET_LITE0_FLOPS_224 = 0.78e9
# A text's tokens, from its characters (WordPiece on English: about 4 characters a token, plus [CLS] and
# [SEP]); a dataset that recorded no mean length is priced at the model's max_length.
CHARS_PER_TOKEN = 4.0

# The reference machine's sustained speed of each architecture's forward pass, in FLOPs per second
# (batched, bench/plan_cost.py): big matrix products run near the cores' peak, depthwise convolutions
# and small feature maps far below it.
FORWARD_FLOPS_PER_SECOND: dict[str, float] = {
    "minilm-l6": 1.4e11,
    "efficientnet-lite0": 7.5e10,
    "resnet-small": 2.1e11,
    "cnn-small": 6.5e10,
    "mlp": 2.0e10,
}
# A training example (forward, backward, the optimiser's share) costs this many forward passes when the whole
# network trains: the backward pass alone is about twice the forward, the rest is memory traffic, which
# depthwise convolutions have much of (EfficientNet's backward pass is the slowest part of all).
FULL_TRAINING_FACTOR: dict[str, float] = {
    "minilm-l6": 4.0,
    "efficientnet-lite0": 9.3,
    "resnet-small": 4.0,
    "cnn-small": 1.7,
    "mlp": 4.0,
}
# partial trains the top blocks: its examples cost a forward pass plus the training of that share of the
# network, which is less than its share of the blocks where the top blocks hold less of the work (an
# EfficientNet's on 7 x 7 maps, a transformer's beside its embeddings).
PARTIAL_SHARE_WEIGHT: dict[str, float] = {"efficientnet-lite0": 0.4, "minilm-l6": 0.4}
# The same with LoRA adapters: the activations' gradients still run down through every layer, and on a
# convolutional network the adapters are convolutions of their own, so it costs as much as training all of
# it, or more (peft's convolution adapters run beside every adapted layer).
LORA_TRAINING_FACTOR: dict[str, float] = {
    "minilm-l6": 3.0,
    "efficientnet-lite0": 8.3,
    "resnet-small": 6.8,
    "cnn-small": 2.2,
}
# What every example costs besides its FLOPs (a tiny network's forward pass is mostly this), in seconds.
EXAMPLE_SECONDS = 2e-6
# What every optimiser step costs besides its examples: the loop's own work (batches, reports, stop
# checks) and AdamW's update of each trainable parameter.
STEP_SECONDS = 1.0e-3
STEP_SECONDS_PER_PARAMETER = 3e-9
# A step of a head alone over cached features (a head warm-up, a linear probe) is a few small tensors.
HEAD_STEP_SECONDS = 2e-4
# What every run costs besides its epochs: building its network, reading its data, its events.
RUN_SECONDS = 0.4
# What every epoch of a run costs besides its steps: its training state journalled (the trained weights,
# the best ones and AdamW's two moments, written and fsynced: bench.resume) and a checkpoint.
EPOCH_SECONDS_PER_PARAMETER = 3.5e-8


class Network(BaseModel):
    """A network as far as its cost goes: the architecture, its input and its options."""

    model_config = ConfigDict(frozen=True)

    architecture: str
    classes: int = 0
    side: int | None = Field(default=None, description="Images: the side they are read at, px.")
    channels: int | None = None
    tokens: float | None = Field(default=None, description="Text: the tokens of a typical example.")
    columns: int | None = Field(default=None, description="Tables: the columns read.")
    options: dict[str, Any] = Field(default_factory=dict)

    @classmethod
    def of(
        cls,
        spec: ModelSpec,
        *,
        classes: int | None = None,
        mean_text_chars: float | None = None,
        columns: int | None = None,
    ) -> Network:
        """The network of `spec` (its input size, options and head), reading texts of `mean_text_chars`
        or tables of `columns` columns when its spec does not say."""
        inputs = spec.input_spec
        found: dict[str, Any] = {
            "architecture": spec.architecture,
            "classes": len(spec.classes) if classes is None else classes,
            "options": {
                k: v
                for k, v in spec.options.items()
                if k in ("width", "stem_stride", "hidden", "layers", "adapter", "in_features")
            },
        }
        if spec.modality == "image":
            found["side"] = int(inputs.get("height", 224))
            found["channels"] = int(inputs.get("channels", 3))
        elif spec.modality == "text":
            limit = int(inputs.get("max_length", 128))
            found["tokens"] = (
                float(limit)
                if mean_text_chars is None
                else min(float(limit), 2 + mean_text_chars / CHARS_PER_TOKEN)
            )
        else:
            known = spec.options.get("in_features") or len(inputs.get("feature_columns", []))
            found["columns"] = int(known or columns or 1)
        return cls(**found)

    @property
    def feature_dim(self) -> int:
        if self.architecture in ("cnn-small", "resnet-small"):
            return 4 * int(self.options.get("width", 32))
        if self.architecture == "mlp":
            return int((self.options.get("hidden") or [128, 128])[-1])
        return int(BUILTIN_MODELS[self.architecture].feature_dim or 0)

    def backbone_flops(self) -> float:
        """FLOPs of one example's forward pass through the backbone (two per multiply-add)."""
        a = self.architecture
        if a == "mlp":
            widths = [int(self.columns or 1), *[int(h) for h in self.options.get("hidden") or [128, 128]]]
            return float(sum(2 * i * o for i, o in itertools.pairwise(widths)))
        if a == "cnn-small":
            c, w, pixels = (
                int(self.channels or 3),
                int(self.options.get("width", 32)),
                float(self.side or 64) ** 2,
            )
            return _conv(c, w, pixels) + _conv(w, 2 * w, pixels / 4) + _conv(2 * w, 4 * w, pixels / 16)
        if a == "resnet-small":
            c, w = int(self.channels or 3), int(self.options.get("width", 32))
            stride = int(self.options.get("stem_stride", 1))
            stem = float(self.side or 32) ** 2 / min(stride, 2) ** 2
            p = stem / (stride // 2) ** 2 if stride > 2 else stem
            return (
                _conv(c, w, stem)
                + 2 * _conv(w, w, p)
                + _conv(w, 2 * w, p / 4) + _conv(2 * w, 2 * w, p / 4) + _conv(w, 2 * w, p / 4, kernel=1)
                + _conv(2 * w, 4 * w, p / 16) + _conv(4 * w, 4 * w, p / 16) + _conv(2 * w, 4 * w, p / 16, kernel=1)
            )  # fmt: skip
        if a == "efficientnet-lite0":
            return EFFICIENTNET_LITE0_FLOPS_224 * (float(self.side or 224) / 224) ** 2
        if a == "minilm-l6":
            layers = int(self.options.get("layers") or 6)
            t, d = float(self.tokens or 128), MINILM_WIDTH
            per_token = (
                2 * (4 * d * d + 2 * d * MINILM_FF) + 4 * t * d
            )  # projections, feed-forward, attention
            return layers * t * per_token
        raise ValueError(f"unknown architecture {a!r}")

    def head_flops(self) -> float:
        """The head's (and a feature adapter's) FLOPs per example: what a step over cached features costs."""
        dim = self.feature_dim
        adapter = int(self.options.get("adapter") or 0)
        return 2.0 * dim * max(self.classes, 1) + 4.0 * dim * adapter

    def flops(self) -> float:
        return self.backbone_flops() + self.head_flops()

    def parameters(self) -> int:
        """Parameters of the backbone (without head and adapter)."""
        a = self.architecture
        if a == "mlp":
            widths = [int(self.columns or 1), *[int(h) for h in self.options.get("hidden") or [128, 128]]]
            return sum(i * o + o for i, o in itertools.pairwise(widths))
        if a in ("cnn-small", "resnet-small"):
            c, w = int(self.channels or 3), int(self.options.get("width", 32))
            if a == "cnn-small":
                return 9 * (c * w + w * 2 * w + 2 * w * 4 * w) + 2 * 7 * w
            return (
                9 * (c * w + 2 * w * w + w * 2 * w + 4 * w * w + 2 * w * 4 * w + 16 * w * w)
                + 2 * w * w + 8 * w * w + 30 * w
            )  # fmt: skip
        if a == "minilm-l6":
            layers = int(self.options.get("layers") or 6)
            d = MINILM_WIDTH
            embeddings = (MINILM_VOCAB + MINILM_POSITIONS + 2) * d + 2 * d
            per_layer = 4 * d * d + 2 * d * MINILM_FF + 9 * d + MINILM_FF
            return embeddings + layers * per_layer
        return int(BUILTIN_MODELS[a].num_parameters or 0)

    def head_parameters(self) -> int:
        dim = self.feature_dim
        adapter = int(self.options.get("adapter") or 0)
        return dim * max(self.classes, 1) + max(self.classes, 1) + 2 * dim * adapter + 3 * dim

    def forward_seconds(self, examples: float) -> float:
        """The reference machine's time to run `examples` through the whole network, without gradients."""
        speed = FORWARD_FLOPS_PER_SECOND[self.architecture]
        return examples * (self.flops() / speed + EXAMPLE_SECONDS)

    def head_seconds(self, examples: float) -> float:
        """The same through the head (and adapter) alone: a step over cached features."""
        return examples * (self.head_flops() * 3 / FORWARD_FLOPS_PER_SECOND["mlp"] + EXAMPLE_SECONDS)


def _conv(cin: int, cout: int, pixels: float, kernel: int = 3) -> float:
    return 2.0 * kernel * kernel * cin * cout * pixels


def training_factor(network: Network, method: str, share: float = 1.0) -> float:
    """A training example's cost in forward passes, by what trains: the whole network (full), the top
    `share` of it (partial: the forward pass, then gradients through the top only), LoRA adapters."""
    full = FULL_TRAINING_FACTOR[network.architecture]
    if method == "partial":
        return 1.0 + (full - 1.0) * share * PARTIAL_SHARE_WEIGHT.get(network.architecture, 1.0)
    if method == "lora":
        return LORA_TRAINING_FACTOR.get(network.architecture, full)
    return full


def step_seconds(trainable_parameters: int, *, head_only: bool = False) -> float:
    base = HEAD_STEP_SECONDS if head_only else STEP_SECONDS
    return base + STEP_SECONDS_PER_PARAMETER * trainable_parameters


def run_overhead_seconds(epochs: int, trainable_parameters: int) -> float:
    """A run's fixed cost and its journal's, each epoch."""
    return RUN_SECONDS + epochs * EPOCH_SECONDS_PER_PARAMETER * trainable_parameters
