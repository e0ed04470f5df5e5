"""Benchmark: semi-supervised fine-tuning against the labels alone, on scikit-learn's handwritten digits.

A few labels per class (2 and 5), 800 unlabelled digits of the same source, the other 947 or so held out
(never trained on). Both arms are resnet-small from scratch with the hyperparameters the service resolves
for a job naming none; the semi-supervised arm is the same job with `unlabeled_dataset` (FixMatch: light
against strong augmentation with cutout, confidence 0.95, 3 unlabelled per labelled example).

    .venv/bin/python -m bench.semi_supervised [--seeds 2]
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path

import bench.quality  # noqa: F401  (bench.defaults and bench.quality import each other)
from bench.cases import few_per_class, handwritten_digits
from bench.common import command_line, markdown_table, median, report
from bench.defaults import dataset
from graft.defaults import SEMI_SUPERVISED_DEFAULTS, resolve_hyperparameters
from graft.jobspec import Hyperparameters
from graft.sources import BaseModelSource
from graft.spec import ModelSpec
from ml.runtime import QuietReporter
from tests.helpers import image_zip, write
from workers.recipes.finetune import FinetuneConfig
from workers.recipes.semi_supervised import SemiSupervisedConfig
from workers.recipes.study import recipe_for

NAME = "semi_supervised"
UNLABELLED = 800


def run(per_class: int, seed: int, folder: Path) -> dict[str, float]:
    examples = handwritten_digits(16)
    random.Random(0).shuffle(examples)
    few, rest = few_per_class(examples, per_class)
    unlabelled, held = rest[:UNLABELLED], rest[UNLABELLED:]
    task = "image_classification"
    train = dataset(write(folder / f"few{per_class}.zip", image_zip(few)), task)
    pool = dataset(write(folder / "unlabelled.zip", image_zip([(None, im) for _, im in unlabelled])), task)
    evaluation = dataset(write(folder / "held.zip", image_zip(held)), task)
    base = BaseModelSource(id="resnet-small", spec=ModelSpec.for_builtin("resnet-small"), pretrained=False)
    hp = Hyperparameters.model_validate(
        resolve_hyperparameters("resnet-small", "full", {}, train_examples=int(len(few) * 0.9))
    )
    labels_only = FinetuneConfig(
        job_id="bench", seed=seed, method="full", base=base, train=train, hyperparameters=hp,
        evaluation=evaluation, save_checkpoints=False,
    )  # fmt: skip
    semi = SemiSupervisedConfig(**dict(labels_only), unlabeled=pool, **SEMI_SUPERVISED_DEFAULTS)  # type: ignore[arg-type]
    out: dict[str, float] = {"held out": float(len(held))}
    for name, config in (("labels alone", labels_only), ("semi-supervised", semi)):
        started = time.perf_counter()
        result = recipe_for(config, QuietReporter()).run()
        assert result.held_out is not None
        out[name] = float(result.held_out["accuracy"])
        out[f"{name} seconds"] = time.perf_counter() - started
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=2)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as temp:
        for per_class in (2, 5):
            runs = [run(per_class, seed, Path(temp)) for seed in range(args.seeds)]
            print(per_class, runs, flush=True)
            alone = [r["labels alone"] for r in runs]
            semi = [r["semi-supervised"] for r in runs]
            rows.append(
                [
                    f"{per_class * 10} labels, {UNLABELLED} unlabelled, {int(runs[0]['held out'])} held out",
                    f"{median(alone):.3f} ({', '.join(f'{v:.3f}' for v in alone)})",
                    f"{median(semi):.3f} ({', '.join(f'{v:.3f}' for v in semi)})",
                    f"{(median(semi) - median(alone)) * 100:+.1f}",
                    f"{median([r['semi-supervised seconds'] / r['labels alone seconds'] for r in runs]):.1f}x",
                ]
            )
    body = (
        f"Held-out accuracy, median of {args.seeds} seeds (per seed in brackets); resnet-small from scratch on "
        "16 px handwritten digits with the defaults a job naming no hyperparameters gets.\n\n"
        + markdown_table(
            ["labels", "labels alone", "semi-supervised (FixMatch)", "gain (points)", "time (semi / alone)"],
            rows,
        )
    )
    report(
        NAME,
        "Semi-supervised fine-tuning (finetune with unlabeled_dataset)",
        command_line("bench.semi_supervised"),
        body,
    )


if __name__ == "__main__":
    main()
