"""Benchmark: what a job with no hyperparameters reaches, for every (architecture, method) Graft offers.

Each row is the recipe with the hyperparameters the service resolves for a job that names none (the
defaults of graft/defaults.py, more epochs for small datasets, batch-norm statistics kept when
fine-tuning learned weights), on small real data:
- minilm-l6: 600 review-like sentences (2 classes);
- efficientnet-lite0: 150 of scikit-learn's handwritten digits as images (10 classes);
- cnn-small and mlp: an upstream model pretrained (with defaults) on digits 0-5, fine-tuned on digits
  6-9 (200 examples; images for cnn-small, the 64 pixels as a table for mlp);
and, as the reference, the same architecture trained from scratch with its `full` defaults.

    .venv/bin/python -m bench.defaults
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import command_line, markdown_table, report, review_rows, seconds
from graft.catalog import BUILTIN_MODELS
from graft.defaults import default_hyperparameters, resolve_hyperparameters
from graft.formats import inspect_dataset
from graft.sources import BaseModelSource, DatasetSource
from graft.spec import ModelSpec
from graft.storage import sha256_file
from ml.runtime import QuietReporter
from ml.weights import save_weights
from tests.helpers import digits_table_csv, digits_zip, text_csv, write
from workers.recipes.finetune import FinetuneConfig, FinetuneRecipe, FinetuneResult

NAME = "defaults"
SEED = 0


def dataset(path: Path, task: str, label_column: str | None = None) -> DatasetSource:
    info = inspect_dataset(path, task=task, fmt=path.suffix.lstrip("."), label_column=label_column)
    return DatasetSource(
        id=path.stem, path=path, task=task, format=info.format, labeled=info.labeled,
        classes=info.classes, schema_info=info.schema_info, sha256=sha256_file(path),
    )  # fmt: skip


def resolved(base: BaseModelSource, method: str, data: DatasetSource) -> dict[str, Any]:
    """The hyperparameters the service gives a job that names none (as POST /v1/jobs resolves them)."""
    split = default_hyperparameters(base.spec.architecture, method)["validation_split"]
    learned = base.pretrained or base.weights_path is not None
    train_examples = int(data_size(data) * (1 - split))
    return resolve_hyperparameters(
        base.spec.architecture, method, {}, train_examples=train_examples, fine_tunes_learned_weights=learned
    )


def data_size(data: DatasetSource) -> int:
    info = inspect_dataset(
        data.path,
        task=data.task,
        fmt=data.format,
        label_column=data.schema_info.get("label_column") if data.task == "tabular_classification" else None,
    )
    return info.num_examples


def train(base: BaseModelSource, method: str, data: DatasetSource) -> tuple[FinetuneResult, float]:
    config = FinetuneConfig(
        job_id="bench", method=method, base=base, train=data, seed=SEED,  # type: ignore[arg-type]
        hyperparameters=resolved(base, method, data),  # type: ignore[arg-type]
    )  # fmt: skip
    started = time.perf_counter()
    result = FinetuneRecipe(config, QuietReporter()).run()
    return result, time.perf_counter() - started


def builtin(architecture: str) -> BaseModelSource:
    return BaseModelSource(
        id=architecture,
        spec=ModelSpec.for_builtin(architecture),
        pretrained=BUILTIN_MODELS[architecture].pretrained,
    )


def upstream(folder: Path, architecture: str, data: DatasetSource) -> BaseModelSource:
    """Pretrain `architecture` from scratch with its defaults and register it like a pretrain job does."""
    result, _ = train(builtin(architecture), "full", data)
    weights = folder / f"{architecture}-upstream.safetensors"
    save_weights(weights, result.state, result.spec)
    return BaseModelSource(
        id=f"{architecture} pretrained on digits 0-5",
        spec=result.spec,
        weights_path=weights,
        weights_sha256=sha256_file(weights),
    )


def main() -> None:
    rows: list[list[object]] = []
    with tempfile.TemporaryDirectory() as temp:
        folder = Path(temp)
        reviews = dataset(
            write(folder / "reviews.csv", text_csv(review_rows(600, seed=SEED))), "text_classification"
        )
        images = dataset(
            write(folder / "digits150.zip", digits_zip(150, classes=range(10), seed=1)),
            "image_classification",
        )
        source_images = dataset(
            write(folder / "digits-0-5.zip", digits_zip(600, classes=range(6), seed=1)),
            "image_classification",
        )
        target_images = dataset(
            write(folder / "digits-6-9.zip", digits_zip(200, classes=range(6, 10), seed=1)),
            "image_classification",
        )
        source_table = dataset(
            write(folder / "table-0-5.csv", digits_table_csv(range(6), 600)),
            "tabular_classification",
            "digit",
        )
        target_table = dataset(
            write(folder / "table-6-9.csv", digits_table_csv(range(6, 10), 200)),
            "tabular_classification",
            "digit",
        )

        cases: list[tuple[str, BaseModelSource, DatasetSource, str]] = []
        for architecture, data, description in (
            ("minilm-l6", reviews, "600 reviews, 2 classes"),
            ("efficientnet-lite0", images, "150 digit images, 10 classes"),
        ):
            for method in BUILTIN_MODELS[architecture].architecture_methods:
                cases.append((method, builtin(architecture), data, description))
        for architecture, source, target in (
            ("cnn-small", source_images, target_images),
            ("mlp", source_table, target_table),
        ):
            base = upstream(folder, architecture, source)
            kind = "images" if architecture == "cnn-small" else "table"
            cases.append(("full (from scratch)", builtin(architecture), target, f"digits 6-9, 200 ({kind})"))
            for method in BUILTIN_MODELS[architecture].architecture_methods:
                cases.append((method, base, target, f"digits 6-9, 200 ({kind}), upstream: digits 0-5"))

        for method, base, data, description in cases:
            result, elapsed = train(base, method.split(" ")[0], data)
            hp = resolved(base, method.split(" ")[0], data)
            rows.append(
                [
                    base.spec.architecture,
                    method,
                    description,
                    f"{hp['epochs']} / {hp['batch_size']} / {hp['learning_rate']:g}",
                    f"{result.metrics['val_accuracy']:.3f}",
                    f"{result.metrics.get('val_macro_f1', 0.0):.3f}",
                    result.best_epoch,
                    seconds(elapsed),
                ]
            )
            print(rows[-1], flush=True)

    body = (
        "Every job here names no hyperparameter: the service's resolution applies (the defaults of its "
        "(architecture, method), more epochs for small datasets; `validation_split` 0.1, seed 0). Validation accuracy and macro-F1 of the best epoch (the result "
        "model's). Upstream models for cnn-small and mlp were pretrained with their `full` defaults on "
        "600 examples of digits 0-5; the from-scratch row is the reference each transfer should beat.\n\n"
        + markdown_table(
            [
                "architecture",
                "method",
                "data",
                "epochs / batch / lr",
                "val accuracy",
                "val macro-F1",
                "best epoch",
                "wall",
            ],
            rows,
        )
    )
    report(NAME, "Defaults: jobs with no hyperparameters", command_line("bench.defaults"), body)


if __name__ == "__main__":
    main()
