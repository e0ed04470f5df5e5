"""Augmentation of training images (kornia, on whole batches, on the training device).

Label-safe by design: no flips (they turn a 2 into a backwards 2, a "b" into a "d"), no hue shifts (a
colour can be the class). Applied to training batches only; validation, evaluation and serving see the
shared preprocessing alone (ml/preprocess.py).

- `light`: a resized crop of 80-100% of the image (aspect 0.9-1.1), shifts of up to 8%, rotations up
  to 10 degrees, scale 0.9-1.1; colour images also a mild brightness, contrast and saturation jitter.
- `strong`: crops of 60-100%, shifts 12%, rotations 15 degrees, shear 10 degrees, stronger jitter.
- `auto` (the default): `light` for a small training set (at most SMALL_DATASET examples) trained for at
  least MIN_AUGMENTED_STEPS steps, `none` otherwise: large data vary enough themselves, and a short run
  has no time to learn through the variation. Measured (bench/quality.py data, resnet-small from scratch,
  its default 240 steps): 50 handwritten digits 0.82 without, 0.93 with `light`; 80 colour glyphs 0.26
  and 0.74. Cut to 32 steps (cnn-small, 54 digits, 8 epochs), `light` left 5 of 12 probes right, `none` 12.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

SMALL_DATASET = 10_000
MIN_AUGMENTED_STEPS = 100

POLICIES: dict[str, dict[str, Any]] = {
    "light": {
        "crop_scale": (0.8, 1.0),
        "translate": 0.08,
        "degrees": 10.0,
        "scale": (0.9, 1.1),
        "shear": 0.0,
        "jitter": 0.2,
    },
    "strong": {
        "crop_scale": (0.6, 1.0),
        "translate": 0.12,
        "degrees": 15.0,
        "scale": (0.85, 1.15),
        "shear": 10.0,
        "jitter": 0.4,
    },
}


def resolve_policy(requested: str, train_examples: int, steps: int) -> str:
    if requested == "auto":
        return "light" if train_examples <= SMALL_DATASET and steps >= MIN_AUGMENTED_STEPS else "none"
    return requested


class ImageAugmenter(nn.Module):
    """Augments a batch of normalised images (N x C x H x W) and returns it normalised again."""

    def __init__(self, policy: str, input_spec: Mapping[str, Any]) -> None:
        super().__init__()
        import kornia.augmentation as K

        settings = POLICIES[policy]
        height, width = int(input_spec["height"]), int(input_spec["width"])
        channels = int(input_spec.get("channels", 3))
        self.mean: Tensor
        self.std: Tensor
        self.register_buffer("mean", torch.tensor(list(input_spec["mean"])).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(list(input_spec["std"])).view(1, -1, 1, 1))
        steps: list[Any] = [
            K.RandomResizedCrop((height, width), scale=settings["crop_scale"], ratio=(0.9, 1.1), p=1.0),
            K.RandomAffine(
                degrees=settings["degrees"],
                translate=(settings["translate"], settings["translate"]),
                scale=settings["scale"],
                shear=settings["shear"] or None,
                padding_mode="border",
                p=1.0,
            ),
        ]
        jitter = settings["jitter"]
        if channels == 3:
            steps.append(K.ColorJiggle(brightness=jitter, contrast=jitter, saturation=jitter, p=0.8))
        else:
            steps.append(K.ColorJiggle(brightness=jitter, contrast=jitter, p=0.8))
        self.pipeline = K.AugmentationSequential(*steps)

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        mean, std = self.mean.to(images.device), self.std.to(images.device)
        pixels = (images.float() * std + mean).clamp(0.0, 1.0)
        out = self.pipeline(pixels)
        return ((out.clamp(0.0, 1.0) - mean) / std).to(images.dtype)


def augmenter_for(
    requested: str,
    modality: str,
    method: str,
    train_examples: int,
    steps: int,
    input_spec: Mapping[str, Any],
) -> tuple[str, ImageAugmenter | None]:
    """(the policy in force, its augmenter or None). Images only; a linear probe trains on cached features
    of the images as they are, so it has none."""
    if modality != "image" or method == "linear_probe":
        return "none", None
    policy = resolve_policy(requested, train_examples, steps)
    return policy, (ImageAugmenter(policy, input_spec) if policy != "none" else None)
