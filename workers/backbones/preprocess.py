"""Input preparation shared by training and serving, so a model sees the same inputs in both.

- text: the backbone's WordPiece tokenizer, truncated to `max_length`, padded per batch;
- images: any size and colour mode -> EXIF-rotated, transparent pixels over white, RGB (or grey), shorter
  side resized, centre-cropped, kept as uint8 CHW until a batch is normalised with the spec's mean/std;
- tabular: the spec's feature columns, in order, as float32 (standardisation lives in the network).
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from functools import lru_cache
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import Tensor

from workers.backbones.spec import ModelSpec

FLOAT32_MAX = float(np.finfo(np.float32).max)


class InputError(ValueError):
    """An input the model cannot take; the message says which one and why."""

    def __init__(self, message: str, index: int | None = None) -> None:
        super().__init__(message)
        self.index = index


# ---------------------------------------------------------------- text


@lru_cache(maxsize=2)
def load_tokenizer(architecture: str) -> Any:
    from transformers import AutoTokenizer

    from workers.backbones.networks import minilm_package_dir

    if architecture != "minilm-l6":
        raise ValueError(f"no tokenizer for {architecture!r}")
    return AutoTokenizer.from_pretrained(str(minilm_package_dir()))


class TextPipeline:
    def __init__(self, spec: ModelSpec) -> None:
        self.tokenizer = load_tokenizer(spec.architecture)
        self.max_length = int(spec.input_spec.get("max_length", 128))
        self.pad_id = int(self.tokenizer.pad_token_id or 0)

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        encoded = self.tokenizer(list(texts), truncation=True, max_length=self.max_length)
        return [list(ids) for ids in encoded["input_ids"]]

    def collate(self, token_ids: Sequence[Sequence[int]]) -> dict[str, Tensor]:
        width = max(len(ids) for ids in token_ids)
        input_ids = torch.full((len(token_ids), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(token_ids), width), dtype=torch.long)
        for row, ids in enumerate(token_ids):
            input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            mask[row, : len(ids)] = 1
        return {"input_ids": input_ids, "attention_mask": mask}

    def __call__(self, texts: Sequence[str]) -> dict[str, Tensor]:
        return self.collate(self.tokenize(texts))


# ---------------------------------------------------------------- images


def _to_8bit(image: Image.Image) -> Image.Image:
    """16-bit and float greyscale images scaled into 0..255 (PIL would clip them)."""
    array = np.asarray(image, dtype=np.float64)
    low, high = float(array.min()), float(array.max())
    scaled = np.zeros_like(array) if high <= low else (array - low) * (255.0 / (high - low))
    return Image.fromarray(scaled.astype(np.uint8), mode="L")


def normalise_mode(image: Image.Image, channels: int) -> Image.Image:
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        image = _to_8bit(image)
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert("L" if channels == 1 else "RGB")


def prepare_image(source: bytes | Image.Image, input_spec: Mapping[str, Any]) -> np.ndarray:
    """One image -> uint8 array (C, H, W) at the spec's size."""
    image = Image.open(io.BytesIO(source)) if isinstance(source, bytes) else source
    image = ImageOps.exif_transpose(image) or image
    channels = int(input_spec.get("channels", 3))
    height, width = int(input_spec["height"]), int(input_spec["width"])
    image = normalise_mode(image, channels)
    scale = max(width / image.width, height / image.height)
    resized = (max(width, round(image.width * scale)), max(height, round(image.height * scale)))
    image = image.resize(resized, Image.Resampling.BILINEAR)
    left, top = (image.width - width) // 2, (image.height - height) // 2
    image = image.crop((left, top, left + width, top + height))
    array = np.asarray(image, dtype=np.uint8)
    if array.ndim == 2:
        array = array[:, :, None]
    return np.ascontiguousarray(array.transpose(2, 0, 1))


def images_to_tensor(arrays: Sequence[np.ndarray] | Tensor, input_spec: Mapping[str, Any]) -> Tensor:
    batch = arrays if isinstance(arrays, Tensor) else torch.from_numpy(np.stack(arrays))
    mean = torch.tensor(input_spec["mean"], dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.tensor(input_spec["std"], dtype=torch.float32).view(1, -1, 1, 1)
    return (batch.float() / 255.0 - mean) / std


# ---------------------------------------------------------------- tabular


def rows_to_array(rows: Sequence[Mapping[str, Any]], feature_columns: Sequence[str]) -> np.ndarray:
    """Rows as mappings -> float32 (N, F) in the spec's column order; a missing or non-numeric value
    raises InputError naming the row and the column."""
    out = np.empty((len(rows), len(feature_columns)), dtype=np.float32)
    for i, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise InputError(f"inputs[{i}] must be an object of column: value", index=i)
        for j, column in enumerate(feature_columns):
            if column not in row:
                raise InputError(f"inputs[{i}] is missing the column '{column}'", index=i)
            value = row[column]
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise InputError(f"inputs[{i}], column '{column}': {value!r} is not a number", index=i)
            try:
                number = float(value)
            except OverflowError:
                number = math.inf
            if not math.isfinite(number) or abs(number) > FLOAT32_MAX:
                raise InputError(
                    f"inputs[{i}], column '{column}': {value!r} is not a finite float32 number", index=i
                )
            out[i, j] = number
    return out
