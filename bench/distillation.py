"""Benchmark: knowledge distillation, teacher against the student trained alone and the distilled student.

- Digits as a table: an mlp teacher ([128, 128]) trained on 1000 handwritten digits; students mlp [32]
  on 150 other labelled digits (the transfer data), evaluated on 300 more; and the same with the transfer
  data's labels removed (the teacher's outputs alone teach the student; no student-alone reference).
- Digits as images: an efficientnet-lite0 teacher (ImageNet weights, linear_probe on 400 digit images);
  a cnn-small student of width 8 on 150 other images, evaluated on 300 more.

Each student uses the hyperparameters a distill job with none gets (3x the architecture's full epochs,
temperature 4, alpha 0.5), seeds 0, 1, 2.

    .venv/bin/python -m bench.distillation
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import command_line, markdown_table, report, seconds
from bench.defaults import builtin, data_size, dataset, train
from graft.defaults import DISTILLATION_DEFAULTS, DISTILLATION_EPOCHS_FACTOR, resolve_hyperparameters
from graft.jobspec import Hyperparameters
from graft.sources import BaseModelSource, DatasetSource
from graft.spec import ModelSpec
from graft.storage import sha256_file
from ml.runtime import QuietReporter
from ml.weights import save_weights
from tests.helpers import digits_table_csv, digits_zip, unlabelled_csv, write
from workers.recipes.distill import DistillConfig, run_distillation

NAME = "distillation"
SEEDS = [0, 1, 2]


def registered(folder: Path, name: str, result: Any) -> BaseModelSource:
    path = folder / f"{name}.safetensors"
    save_weights(path, result.state, result.spec)
    return BaseModelSource(id=name, spec=result.spec, weights_path=path, weights_sha256=sha256_file(path))


def distil(
    teacher: BaseModelSource,
    student: ModelSpec,
    transfer: DatasetSource,
    evaluation: DatasetSource,
    seed: int,
) -> dict[str, Any]:
    hyperparameters = resolve_hyperparameters(
        student.architecture, "full", {}, train_examples=data_size(transfer), fine_tunes_learned_weights=False
    )
    hyperparameters["epochs"] = min(hyperparameters["epochs"] * DISTILLATION_EPOCHS_FACTOR, 1000)
    config = DistillConfig(
        job_id="bench",
        seed=seed,
        method="full",
        base=BaseModelSource(id="student", spec=student, pretrained=False),
        teacher=teacher,
        train=transfer,
        validation=evaluation,
        hyperparameters=Hyperparameters.model_validate(hyperparameters),
        save_checkpoints=False,
        temperature=DISTILLATION_DEFAULTS["temperature"],
        alpha=DISTILLATION_DEFAULTS["alpha"],
    )
    return run_distillation(config, QuietReporter()).report


def rows_for(case: str, reports: list[dict[str, Any]]) -> list[list[object]]:
    def mean(arm: str, key: str) -> str:
        values = [r[arm][key] for r in reports if r[arm] is not None]
        if not values:
            return "n/a"
        sd = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{statistics.fmean(values):.3f} ± {sd:.3f}" if key != "num_parameters" else f"{values[0]:,}"

    rows: list[list[object]] = []
    for arm, label in (
        ("teacher", "teacher"),
        ("scratch_student", "student alone"),
        ("distilled_student", "distilled student"),
    ):
        first = reports[0][arm]
        rows.append(
            [
                case,
                label,
                mean(arm, "accuracy"),
                mean(arm, "agreement_with_teacher"),
                f"{first['num_parameters']:,}" if first else "n/a",
                f"{first['checkpoint_bytes'] / 1024:.0f} KiB" if first else "n/a",
                f"{statistics.median(r[arm]['cpu_latency_ms'] for r in reports):.2f} ms" if first else "n/a",
            ]
        )
    gaps = [r["gap_recovered"] for r in reports if r["gap_recovered"] is not None]
    if gaps:
        rows[-1][0] = f"{case} (gap recovered {statistics.fmean(gaps) * 100:.0f}%)"
    return rows


def main() -> None:
    rows: list[list[object]] = []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as temp:
        folder = Path(temp)
        table = lambda data, name: dataset(write(folder / name, data), "tabular_classification", "digit")  # noqa: E731
        big = table(digits_table_csv(range(10), 1000), "teacher.csv")
        transfer = table(digits_table_csv(range(10), 150, offset=1000), "transfer.csv")
        bare = dataset(
            write(
                folder / "transfer-unlabelled.csv",
                unlabelled_csv(digits_table_csv(range(10), 150, offset=1000)),
            ),
            "tabular_classification",
        )
        evaluation = table(digits_table_csv(range(10), 300, offset=1400), "evaluation.csv")
        teacher_result, _ = train(builtin("mlp"), "full", big)
        teacher = registered(folder, "mlp teacher", teacher_result)
        student = ModelSpec.for_builtin("mlp").model_copy(update={"options": {"hidden": [32]}})
        rows += rows_for(
            "table, labelled transfer data",
            [distil(teacher, student, transfer, evaluation, s) for s in SEEDS],
        )
        rows += rows_for(
            "table, unlabelled transfer data", [distil(teacher, student, bare, evaluation, s) for s in SEEDS]
        )

        images = lambda data, name: dataset(write(folder / name, data), "image_classification")  # noqa: E731
        teacher_images = images(digits_zip(400, classes=range(10), seed=5), "teacher.zip")
        transfer_images = images(digits_zip(150, classes=range(10), seed=5, offset=400), "transfer.zip")
        evaluation_images = images(digits_zip(300, classes=range(10), seed=5, offset=550), "evaluation.zip")
        probe, _ = train(builtin("efficientnet-lite0"), "linear_probe", teacher_images)
        image_teacher = registered(folder, "efficientnet teacher", probe)
        cnn = ModelSpec.for_builtin("cnn-small").model_copy(update={"options": {"width": 8}})
        rows += rows_for(
            "images, efficientnet-lite0 → cnn-small (width 8)",
            [distil(image_teacher, cnn, transfer_images, evaluation_images, s) for s in SEEDS],
        )
    body = (
        f"Accuracy on held-out labelled data (mean ± sd over seeds {SEEDS}); agreement: the share of predictions "
        "equal to the teacher's; latency: the median CPU time of one forward pass over a batch of 32. Gap "
        "recovered: (distilled - alone) / (teacher - alone) accuracy.\n\n"
        + markdown_table(
            [
                "case",
                "model",
                "accuracy",
                "agreement with teacher",
                "parameters",
                "checkpoint",
                "CPU latency",
            ],
            rows,
        )
        + f"\n\nTotal {seconds(time.perf_counter() - started)}.\n"
    )
    report(NAME, "Distillation (distill jobs)", command_line("bench.distillation"), body)


if __name__ == "__main__":
    main()
