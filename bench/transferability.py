"""Benchmark: do the transferability scores rank upstream models the way fine-tuning does?

Downstream task: 300 handwritten digits 6-9 as images. Candidates: efficientnet-lite0 (ImageNet), and
cnn-small with random weights, pretrained on 600 digits 0-5 (supervised), pretrained on the same images
without labels (self-supervised), and pretrained on them with shuffled labels (a poor upstream model).
For each: the scores of POST /v1/transferability's computation (one forward pass), and the validation
accuracy that fine-tuning really reached (linear_probe with its defaults, seeds 0-2). Spearman and Kendall
rank correlations between each score and that accuracy.

    .venv/bin/python -m bench.transferability
"""

from __future__ import annotations

import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from scipy.stats import kendalltau, spearmanr

from bench.common import command_line, markdown_table, report, seconds
from bench.defaults import builtin, dataset, resolved
from bench.distillation import registered
from graft.defaults import default_hyperparameters
from graft.jobspec import Hyperparameters
from graft.sources import BaseModelSource, DatasetSource
from ml.rank import rank_models
from ml.runtime import QuietReporter
from tests.helpers import DIGIT_NAMES, digit_images, digits_zip, image_zip, write
from workers.recipes.finetune import FinetuneConfig, FinetuneRecipe
from workers.recipes.self_supervised import SelfSupervisedConfig, SelfSupervisedRecipe

NAME = "transferability"
SEEDS = [0, 1, 2]
METRICS = ["logme", "hscore", "leep", "nce"]


def fine_tuned_accuracy(base: BaseModelSource, method: str, data: DatasetSource) -> float:
    values = []
    for seed in SEEDS:
        config = FinetuneConfig(
            job_id="bench", method=method, base=base, train=data, seed=seed,  # type: ignore[arg-type]
            hyperparameters=resolved(base, method, data),  # type: ignore[arg-type]
        )  # fmt: skip
        values.append(FinetuneRecipe(config, QuietReporter()).run().metrics["val_accuracy"])
    return statistics.fmean(values)


def pretrain(data: DatasetSource) -> Any:
    """cnn-small trained from scratch on `data` with its full defaults, as a pretrain job does."""
    base = builtin("cnn-small")
    hyperparameters = Hyperparameters.model_validate(resolved(base, "full", data))
    config = FinetuneConfig(
        job_id="bench", method="full", base=base, train=data, hyperparameters=hyperparameters
    )
    return FinetuneRecipe(config, QuietReporter()).run()


def main() -> None:
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as temp:
        folder = Path(temp)
        upstream_images = digit_images(600, range(6), seed=1)
        source = dataset(
            write(folder / "digits-0-5.zip", image_zip([(DIGIT_NAMES[d], im) for d, im in upstream_images])),
            "image_classification",
        )
        shuffled_labels = [d for d, _ in upstream_images]
        random.Random(0).shuffle(shuffled_labels)
        shuffled = dataset(
            write(
                folder / "shuffled.zip",
                image_zip(
                    [
                        (DIGIT_NAMES[d], im)
                        for d, (_, im) in zip(shuffled_labels, upstream_images, strict=True)
                    ]
                ),
            ),
            "image_classification",
        )
        pool = dataset(
            write(folder / "pool.zip", image_zip([(None, im) for _, im in upstream_images])),
            "image_classification",
        )
        target = dataset(
            write(folder / "digits-6-9.zip", digits_zip(300, classes=range(6, 10), seed=2)),
            "image_classification",
        )

        supervised = pretrain(source)
        poor = pretrain(shuffled)
        ssl = SelfSupervisedRecipe(
            SelfSupervisedConfig(
                job_id="bench",
                base=builtin("cnn-small"),
                train=pool,
                hyperparameters=Hyperparameters.model_validate(
                    default_hyperparameters("cnn-small", "self_supervised")
                ),
                save_checkpoints=False,
            ),
            QuietReporter(),
        ).run()
        candidates = [
            builtin("efficientnet-lite0"),
            builtin("cnn-small"),
            registered(folder, "cnn-small supervised on digits 0-5", supervised),
            registered(folder, "cnn-small self-supervised on digits 0-5", ssl),
            registered(folder, "cnn-small on shuffled labels", poor),
        ]
        ranking_started = time.perf_counter()
        ranked = rank_models(
            candidates, target, METRICS, rank_by="logme", cache_dir=folder / "cache", max_examples=2000
        )
        ranking_seconds = time.perf_counter() - ranking_started
        accuracy: dict[str, dict[str, float]] = {}
        for base in candidates:
            accuracy[base.id] = {"linear_probe": fine_tuned_accuracy(base, "linear_probe", target)}
            print(base.id, accuracy[base.id], flush=True)

    rows = []
    for result in ranked["results"]:
        scores = result["scores"]
        rows.append(
            [result["model"]]
            + [f"{scores[m]:.3f}" if scores[m] is not None else "n/a" for m in METRICS]
            + [f"{accuracy[result['model']]['linear_probe']:.3f}"]
        )
    correlations = []
    for metric in METRICS:
        for method in ("linear_probe",):
            pairs: list[tuple[float, float]] = [
                (r["scores"][metric], accuracy[r["model"]][method])
                for r in ranked["results"]
                if r["scores"][metric] is not None and method in accuracy[r["model"]]
            ]
            if len(pairs) < 3:
                correlations.append([metric, method, len(pairs), "n/a", "n/a"])
                continue
            x, y = zip(*pairs, strict=True)
            correlations.append(
                [
                    metric,
                    method,
                    len(pairs),
                    f"{spearmanr(x, y).statistic:+.2f}",
                    f"{kendalltau(x, y).statistic:+.2f}",
                ]
            )
    body = (
        f"Downstream: 300 digits 6-9 (images). Fine-tuning: `linear_probe` with its defaults (what the feature "
        f"scores predict: how good the frozen features are; for random weights, the recipe run directly, since the "
        f"service offers only `full` there), validation accuracy averaged over seeds {SEEDS}. The scores "
        f"took {seconds(ranking_seconds)} for all five models (one forward pass each, feature cache empty).\n\n"
        + markdown_table(["model", *METRICS, "linear_probe accuracy"], rows)
        + "\n\nRank correlation between each score and the accuracy fine-tuning reached (LEEP and NCE only over "
        "the models with a source head):\n\n"
        + markdown_table(["score", "fine-tuning", "models", "Spearman", "Kendall"], correlations)
        + f"\n\nTotal {seconds(time.perf_counter() - started)}.\n"
    )
    report(NAME, "Transferability (POST /v1/transferability)", command_line("bench.transferability"), body)


if __name__ == "__main__":
    main()
