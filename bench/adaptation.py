"""Benchmark: domain adaptation on two domain-shift pairs built from data the project has, every method
beside source_only, over three seeds.

- Digits to inverted digits (images, cnn-small from scratch): scikit-learn's handwritten digits as the
  labelled source; the target domain is the same kind of digits drawn light on dark, slightly rotated and
  noisy (other examples than the source's); labelled target examples held out for evaluation only.
- A planted shortcut (a table, mlp from scratch): a column that tracks the label in the source and is
  shifted noise in the target (tests/helpers.shifted_table_csv).

Every run uses the hyperparameters an adapt job with none gets (the architecture's `full` defaults,
scaled to the data; adaptation_weight 1.0); the image pair runs again with adaptation_weight 0.1, since the
right weight depends on the data and cannot be chosen with target labels in real use.

    .venv/bin/python -m bench.adaptation
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from bench.common import command_line, markdown_table, report, seconds
from bench.defaults import dataset
from graft.defaults import ADAPTATION_DEFAULTS, resolve_hyperparameters
from graft.jobspec import Hyperparameters
from graft.sources import BaseModelSource, DatasetSource
from graft.spec import ModelSpec
from ml.runtime import QuietReporter
from tests.helpers import digit_images, image_zip, shifted_table_csv, write
from workers.recipes.adapt import AdaptConfig, run_adaptation

NAME = "adaptation"
SEEDS = [0, 1, 2]
METHODS = ["dann", "coral", "mmd", "mcc", "pseudo_label"]


class ProgressReporter(QuietReporter):
    """Quiet, but says when each run starts (the image pair takes a while on a CPU)."""

    def event(self, message: str, **_: Any) -> None:
        if message.startswith("[") and "Adapting with" in message:
            print(message.split("]")[0] + "]", flush=True)


def distorted(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """The target domain's rendering: inverted, rotated by up to 15 degrees, with pixel noise."""
    pixels = 255 - np.asarray(image.rotate(float(rng.uniform(-15, 15)), fillcolor=0), dtype=np.float32)
    pixels = np.clip(pixels + rng.normal(0, 20, pixels.shape), 0, 255).astype(np.uint8)
    return Image.fromarray(pixels, mode="L")


def digits_pair(folder: Path) -> tuple[DatasetSource, DatasetSource, DatasetSource]:
    rng = np.random.default_rng(0)
    names = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    source = digit_images(300, range(10), seed=11)
    target = digit_images(300, range(10), seed=11, offset=300)
    evaluation = digit_images(300, range(10), seed=11, offset=600)
    return (
        dataset(
            write(folder / "digits.zip", image_zip([(names[d], im) for d, im in source])),
            "image_classification",
        ),
        dataset(
            write(folder / "inverted.zip", image_zip([(None, distorted(im, rng)) for _, im in target])),
            "image_classification",
        ),
        dataset(
            write(
                folder / "inverted-eval.zip",
                image_zip([(names[d], distorted(im, rng)) for d, im in evaluation]),
            ),
            "image_classification",
        ),
    )


def table_pair(folder: Path) -> tuple[DatasetSource, DatasetSource, DatasetSource]:
    return (
        dataset(
            write(folder / "source.csv", shifted_table_csv(600, domain="source")), "tabular_classification"
        ),
        dataset(
            write(folder / "target.csv", shifted_table_csv(600, domain="target", with_labels=False)),
            "tabular_classification",
        ),
        dataset(
            write(folder / "target-eval.csv", shifted_table_csv(300, domain="target", seed=7)),
            "tabular_classification",
        ),
    )


def study(
    architecture: str,
    pair: tuple[DatasetSource, DatasetSource, DatasetSource],
    weight: float = ADAPTATION_DEFAULTS["adaptation_weight"],
    methods: list[str] = METHODS,
) -> tuple[dict[str, Any], float]:
    source, target, evaluation = pair
    split = 0.1
    hyperparameters = resolve_hyperparameters(
        architecture, "full", {}, train_examples=int(source_size(source) * (1 - split))
    )
    config = AdaptConfig(
        job_id="bench",
        seed=SEEDS[0],
        method="full",
        base=BaseModelSource(id=architecture, spec=ModelSpec.for_builtin(architecture), pretrained=False),
        train=source,
        target=target,
        evaluation=evaluation,
        hyperparameters=Hyperparameters.model_validate(hyperparameters),
        save_checkpoints=False,
        adaptation_weight=weight,
        pseudo_label_threshold=ADAPTATION_DEFAULTS["pseudo_label_threshold"],
        mcc_temperature=ADAPTATION_DEFAULTS["mcc_temperature"],
    )
    started = time.perf_counter()
    result = run_adaptation(config, ProgressReporter(), methods=methods, seeds=SEEDS)  # type: ignore[arg-type]
    return result.report, time.perf_counter() - started


def source_size(data: DatasetSource) -> int:
    from bench.defaults import data_size

    return data_size(data)


def table(report: dict[str, Any]) -> str:
    rows = []
    for method, entry in report["methods"].items():
        accuracy = entry["target_accuracy"]
        gain = (report["gain_over_source_only"] or {}).get(method)
        rows.append(
            [
                method,
                f"{accuracy['mean']:.3f} ± {accuracy['std']:.3f}",
                ", ".join(f"{v:.3f}" for v in accuracy["values"]),
                "" if gain is None else f"{gain['mean'] * 100:+.1f} ± {gain['std'] * 100:.1f}",
                f"{entry['target_macro_f1']['mean']:.3f}",
                f"{entry['source_val_accuracy']['mean']:.3f}",
                f"{entry['a_distance']['mean']:.2f}",
                f"{entry['prediction_entropy']['mean']:.3f}",
            ]
        )
    return markdown_table(
        [
            "method",
            "target accuracy (mean ± sd)",
            "per seed",
            "gain over source_only (points)",
            "target macro-F1",
            "source val accuracy",
            "A-distance",
            "target entropy",
        ],
        rows,
    )


def body(parts: list[str]) -> str:
    return (
        "Each method is a full run of an adapt job's training (the defaults an adapt job with no hyperparameters "
        f"gets) with seeds {SEEDS}; target accuracy is on held-out labelled target examples the training never "
        "sees; the target data's labels are never read. A-distance (0: the domains' features are "
        "indistinguishable, 2: separable) and prediction entropy need no labels.\n\n" + "\n".join(parts)
    )


def main() -> None:
    parts = []
    with tempfile.TemporaryDirectory() as temp:
        folder = Path(temp)
        digits, tables = digits_pair(folder), table_pair(folder)
        cases: list[tuple[str, str, Any, float, list[str]]] = [
            ("Planted shortcut column (table, mlp from scratch)", "mlp", tables, 1.0, METHODS),
            (
                "Digits → inverted, rotated, noisy digits (images, cnn-small from scratch)",
                "cnn-small",
                digits,
                1.0,
                METHODS,
            ),
            (
                "The same digits with `adaptation_weight` 0.1 (dann and mmd)",
                "cnn-small",
                digits,
                0.1,
                ["dann", "mmd"],
            ),
        ]
        for title, architecture, pair, weight, methods in cases:
            result, elapsed = study(architecture, pair, weight, methods)
            part = (
                f"### {title}\n\n{table(result)}\n\nHelped beyond the noise: "
                f"{', '.join(result['helped']) or 'none'}. {len(methods) + 1} methods x {len(SEEDS)} seeds in "
                f"{seconds(elapsed)}.\n"
            )
            print(part, flush=True)
            parts.append(part)
            # Written after each pair, so that a long run leaves what it has measured so far.
            report(NAME, "Domain adaptation (adapt jobs)", command_line("bench.adaptation"), body(parts))


if __name__ == "__main__":
    main()
