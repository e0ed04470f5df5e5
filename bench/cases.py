"""Data for the quality suite: small-data transfer cases built from what the project can have offline.

- Printed digits: the ten digits drawn in the 22 DejaVu faces (serif, sans, mono; bold, oblique,
  condensed, light) at random sizes, slants, rotations, shifts and stroke widths, white on black at
  28 px: a realistic upstream source of labelled digits with a drawing style of its own.
- Handwritten digits: scikit-learn's 1,797 handwritten digits (8x8, 17 grey levels), the target: another
  drawing style, another resolution, another pixel distribution.
- Coloured glyphs: printed letters in colour over textured, coloured backgrounds (colour images whose
  class is the shape, not the colour), with a palette shift between two domains.

Every generator is seeded, so a case is the same data on every machine.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

FONT_DIR = Path("/usr/share/fonts/truetype/dejavu")
DIGITS = [str(d) for d in range(10)]


@lru_cache(maxsize=1)
def font_files() -> list[Path]:
    """The DejaVu faces on this machine (the Debian package fonts-dejavu-core is on most systems; PIL's
    own default font is the fallback)."""
    return sorted(p for p in FONT_DIR.glob("*.ttf") if "MathTeX" not in p.name)


def _font(path: Path | None, size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    if path is None:
        return ImageFont.load_default(size=size)
    return ImageFont.truetype(str(path), size=size)


def printed_glyph(
    char: str, rng: np.random.Generator, *, side: int = 28, foreground: int = 255, background: int = 0
) -> Image.Image:
    """One character drawn in a random face, size, stroke, slant, rotation and position (grey, L)."""
    fonts = font_files() or [None]
    canvas = 3 * side
    image = Image.new("L", (canvas, canvas), background)
    draw = ImageDraw.Draw(image)
    size = int(rng.integers(int(side * 0.75), int(side * 1.1)))
    font = _font(fonts[int(rng.integers(len(fonts)))], size)
    stroke = int(rng.integers(0, 3))
    draw.text(
        (canvas / 2, canvas / 2),
        char,
        fill=foreground,
        font=font,
        anchor="mm",
        stroke_width=stroke,
        stroke_fill=foreground,
    )
    shear = float(rng.uniform(-0.3, 0.3))
    image = image.transform(
        image.size, Image.Transform.AFFINE, (1, shear, -shear * canvas / 2, 0, 1, 0), fillcolor=background
    )
    image = image.rotate(
        float(rng.uniform(-15, 15)), resample=Image.Resampling.BILINEAR, fillcolor=background
    )
    # Crop to the ink with a margin (as digit datasets centre their digits), then shift a little.
    box = image.point(lambda v: 255 if abs(v - background) > 40 else 0).getbbox() or (0, 0, canvas, canvas)
    width, height = box[2] - box[0], box[3] - box[1]
    extent = int(max(width, height) * rng.uniform(1.15, 1.45))
    cx = (box[0] + box[2]) / 2 + rng.uniform(-0.08, 0.08) * extent
    cy = (box[1] + box[3]) / 2 + rng.uniform(-0.08, 0.08) * extent
    crop = image.crop(
        (int(cx - extent / 2), int(cy - extent / 2), int(cx + extent / 2), int(cy + extent / 2))
    )
    return crop.resize((side, side), Image.Resampling.LANCZOS)


def printed_digits(n: int, seed: int, *, side: int = 28) -> list[tuple[str, Image.Image]]:
    """`n` printed digits, classes balanced, in a seeded order."""
    rng = np.random.default_rng(seed)
    labels = [DIGITS[i % 10] for i in range(n)]
    rng.shuffle(labels)
    return [(label, printed_glyph(label, rng, side=side)) for label in labels]


def handwritten_digits(side: int = 16) -> list[tuple[str, Image.Image]]:
    """scikit-learn's handwritten digits, white on black, upsampled from 8x8 to `side` pixels, in a fixed
    shuffled order."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    order = np.random.default_rng(1).permutation(len(digits.target))
    out = []
    for i in order:
        pixels = (digits.images[i] * (255.0 / 16.0)).astype(np.uint8)
        image = Image.fromarray(pixels, mode="L").resize((side, side), Image.Resampling.BILINEAR)
        out.append((DIGITS[int(digits.target[i])], image))
    return out


LETTERS = list("AEHKMRSX")  # shapes that stay distinct under colour and texture


def coloured_glyphs(n: int, seed: int, *, domain: str, side: int = 32) -> list[tuple[str, Image.Image]]:
    """Colour images of eight letters over textured backgrounds. Domain "warm": reds and yellows on
    dark blue noise; domain "cool": greens and cyans on light, blurred, striped grounds."""
    rng = np.random.default_rng(seed)
    labels = [LETTERS[i % len(LETTERS)] for i in range(n)]
    rng.shuffle(labels)
    out = []
    for label in labels:
        mask = printed_glyph(label, rng, side=side)
        if domain == "warm":
            ink = rng.uniform([180, 60, 0], [255, 200, 60])
            ground = rng.normal([30, 40, 110], 25, size=(side, side, 3))
        else:
            ink = rng.uniform([0, 120, 60], [90, 255, 255])
            stripes = (np.sin(np.arange(side) * rng.uniform(0.3, 1.2))[None, :, None] * 30).repeat(side, 0)
            ground = rng.normal([200, 190, 170], 15, size=(side, side, 3)) + stripes
        alpha = np.asarray(mask, dtype=np.float64)[:, :, None] / 255.0
        pixels = alpha * ink + (1 - alpha) * ground
        image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), mode="RGB")
        if domain != "warm":
            image = image.filter(ImageFilter.GaussianBlur(0.6))
        out.append((label, image))
    return out


def few_per_class(
    examples: Sequence[tuple[str, Image.Image]], per_class: int
) -> tuple[list[tuple[str, Image.Image]], list[tuple[str, Image.Image]]]:
    """(the first `per_class` examples of each class, the rest): a few labels and a held-out set."""
    taken: dict[str, int] = {}
    few, rest = [], []
    for label, image in examples:
        if taken.get(label, 0) < per_class:
            taken[label] = taken.get(label, 0) + 1
            few.append((label, image))
        else:
            rest.append((label, image))
    return few, rest


def as_arrays(
    examples: Sequence[tuple[str, Image.Image]], classes: Sequence[str]
) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 images N x C x H x W, int labels) for hand-written references."""
    index = {name: i for i, name in enumerate(classes)}
    images = []
    for _, image in examples:
        array = np.asarray(image, dtype=np.uint8)
        images.append(array[None] if array.ndim == 2 else array.transpose(2, 0, 1))
    return np.stack(images), np.array([index[label] for label, _ in examples])
