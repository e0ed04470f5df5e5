"""Input preparation shared by training and serving, so a model sees the same inputs in both.

- text: cut to the part its first `max_length` tokens come from, then the backbone's WordPiece tokenizer,
  truncated to `max_length`, padded per batch;
- images: any size and colour mode -> EXIF-rotated, transparent pixels over white, RGB (or grey), shorter
  side resized, centre-cropped, kept as uint8 CHW until a batch is normalised with the spec's mean/std;
- tabular: the spec's feature columns, in order, as float32 (standardisation lives in the network).
"""

from __future__ import annotations

import io
import math
import re
from collections.abc import Mapping, Sequence
from functools import lru_cache
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import Tensor

from graft.errors import InvalidData
from graft.formats import MAX_TABLE_MAGNITUDE
from graft.spec import ModelSpec


class InputError(InvalidData, ValueError):
    """An input the model cannot take; the message says which one and why."""

    def __init__(self, message: str, index: int | None = None) -> None:
        super().__init__(message, param="inputs", code="invalid_input")
        self.index = index


# ---------------------------------------------------------------- text


@lru_cache(maxsize=2)
def load_tokenizer(architecture: str) -> Any:
    from transformers import AutoTokenizer

    from ml.networks import minilm_package_dir

    if architecture != "minilm-l6":
        raise ValueError(f"no tokenizer for {architecture!r}")
    return AutoTokenizer.from_pretrained(str(minilm_package_dir()))


# What the BERT normaliser (clean_text) deletes before anything else, and deleting first is the same
# transformation done earlier: part of its list (C0 and C1 controls but tab and newlines, soft hyphen,
# zero-width and direction marks, BOM) and U+FFFD.
_DELETED = re.compile(
    "[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\xad\u200b-\u200f\u202a-\u202e"
    "\u2060-\u2064\u2066-\u206f\ufeff\ufffd]+"
)
# The deleted characters Python's split takes for whitespace: gone before splitting, they join their
# neighbours as the tokenizer has them do.
_SPLIT_CONTROLS = "\x0b\x0c\x1c\x1d\x1e\x1f\x85"
# WordPiece reads a word of more than 100 characters as one [UNK]. ASCII letters and digits stay one
# character each through lowercasing and never split a word, so keeping 101 of a longer run keeps that
# word above 100 characters: the same [UNK].
_LONG_ASCII_RUN = re.compile("([A-Za-z0-9]{101})[A-Za-z0-9]+")
# Characters before which a word always ends (space, ASCII punctuation, the CJK ideographs the
# tokenizer splits one by one): text cut just before one holds whole words only.
_WORD_END = re.compile(
    "[ !-/:-@\\[-`{-~\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002a6df"
    "\U0002a700-\U0002ceaf\U0002f800-\U0002fa1f]"
)
# After the clean-up, every word (a run between spaces, punctuation and CJK ideographs) of realistic
# text is at most 101 characters and one space at most separates it from the next; each yields at least
# one token. So max_length * 102 characters, cut back to a word end, hold at least max_length - 1 whole
# words: enough for the max_length - 2 tokens between [CLS] and [SEP]. That is exact for every ASCII or
# CJK-ideograph text; scripts with longer words are checked by counting (TextPipeline.clip).
CHARS_PER_TOKEN = 102
# How far (x the budget) clip widens for text whose budget holds too few tokens before it settles.
MAX_WIDENING = 16


def clean_text(text: str) -> str:
    """`text` without what cannot change its tokens: deleted characters, whitespace runs (one space
    instead: what Python's split takes for whitespace, once those controls are gone, is what the fast
    BERT tokenizer separates words with), ASCII runs past 101 characters. The tokens are those of
    `text`, and the clean-up of a prefix is a prefix of the clean-up of the whole."""
    for control in _SPLIT_CONTROLS:
        text = text.replace(control, "")
    # Whitespace runs first (split is fast, and they are what leaves a text much shorter), then the
    # deletions, which may leave two spaces side by side.
    text = " ".join(text.split())
    if _DELETED.search(text):
        text = " ".join(_DELETED.sub("", text).split())
    return _LONG_ASCII_RUN.sub(r"\1", text)


def _clean_prefix(text: str, budget: int) -> str:
    """A prefix of `clean_text(text)` longer than `budget`, or all of it; reads as little as it can."""
    window = budget
    while True:
        cleaned = clean_text(text[:window])
        if len(cleaned) > budget or window >= len(text):
            return cleaned
        window *= 4


def _last_word_end(text: str, budget: int) -> int | None:
    """The largest i <= budget (i > 0) such that a word ends before text[i]; None if there is none."""
    found = _WORD_END.search(text[budget::-1])
    if found is None or found.start() >= budget:
        return None
    return budget - found.start()


class TextPipeline:
    def __init__(self, spec: ModelSpec) -> None:
        self.tokenizer = load_tokenizer(spec.architecture)
        self.max_length = int(spec.input_spec.get("max_length", 128))
        self.pad_id = int(self.tokenizer.pad_token_id or 0)
        self.char_budget = self.max_length * CHARS_PER_TOKEN
        self.content_tokens = self.max_length - int(self.tokenizer.num_special_tokens_to_add(pair=False))

    def clip(self, text: str) -> str:
        """The part of `text` its first max_length tokens come from (their ids unchanged), so that a
        text of megabytes is tokenised in milliseconds: the tokenizer reads every character it is given,
        though the model reads only max_length tokens."""
        if len(text) <= self.char_budget:
            return text
        budget = self.char_budget
        while True:
            cleaned = _clean_prefix(text, budget)
            if len(cleaned) <= budget:
                return cleaned
            end = _last_word_end(cleaned, budget)
            clipped = cleaned[:budget] if end is None else cleaned[:end]
            # Whole words only: their tokens are the first tokens of the text. Enough of them settles it.
            if budget >= self.char_budget * MAX_WIDENING or (
                end is not None and self._count_tokens(clipped) >= self.content_tokens
            ):
                return clipped
            budget *= 4

    def _count_tokens(self, text: str) -> int:
        # Truncated at what is wanted: only whether there are that many matters.
        ids = self.tokenizer(text, add_special_tokens=False, truncation=True, max_length=self.content_tokens)
        return len(ids["input_ids"])

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        clipped = [self.clip(text) for text in texts]
        encoded = self.tokenizer(clipped, truncation=True, max_length=self.max_length)
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


def crop_box(size: tuple[int, int], width: int, height: int) -> tuple[float, float, float, float]:
    """The part of an image of `size` (width, height) that "shorter side resized to the input, then centre
    crop" keeps, in the image's own pixels: resizing only that part to (width, height) gives the same
    pixels as resizing the whole and cropping (the same scale, the same sample positions, the filter's
    reach clipped at the same edges), at the cost of the output alone. Resizing the whole first costs what
    the resized image holds: a 1 x 60,000 strip read at 64 px would become 64 x 3,840,000 pixels (1 GB)."""
    scale = max(width / size[0], height / size[1])
    resized = (max(width, round(size[0] * scale)), max(height, round(size[1] * scale)))
    left, top = (resized[0] - width) // 2, (resized[1] - height) // 2
    x, y = size[0] / resized[0], size[1] / resized[1]  # image pixels per resized pixel, on each axis
    return (left * x, top * y, (left + width) * x, (top + height) * y)


def prepare_image(source: bytes | Image.Image, input_spec: Mapping[str, Any]) -> np.ndarray:
    """One image -> uint8 array (C, H, W) at the spec's size: the work is the decoded image's and the
    output's, whatever its shape."""
    image = Image.open(io.BytesIO(source)) if isinstance(source, bytes) else source
    image = ImageOps.exif_transpose(image) or image
    channels = int(input_spec.get("channels", 3))
    height, width = int(input_spec["height"]), int(input_spec["width"])
    image = normalise_mode(image, channels)
    image = image.resize((width, height), Image.Resampling.BILINEAR, box=crop_box(image.size, width, height))
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
            if not math.isfinite(number) or abs(number) > MAX_TABLE_MAGNITUDE:
                raise InputError(
                    f"inputs[{i}], column '{column}': {value!r} is not a finite number of magnitude at most "
                    f"{MAX_TABLE_MAGNITUDE:g}",
                    index=i,
                )
            out[i, j] = number
    return out
