"""The transfer report on constructed cases: it flags negative transfer from an upstream model trained on
shuffled labels, and shows the gain of one trained on real labels; every field agrees with the runs."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from graft.defaults import default_hyperparameters
from graft.report import render_png
from graft.sources import BaseModelSource, DatasetSource
from ml.weights import save_weights
from tests.helpers import write
from tests.unit.test_finetune_recipe import ListReporter, run, source
from workers.recipes.finetune import FinetuneConfig
from workers.recipes.study import Arm, StudyResult, run_study

SEEDS = [1, 2, 3]


def digits_csv(indices: np.ndarray, labels: np.ndarray) -> bytes:
    """scikit-learn's handwritten digits as a table: 64 pixel columns and the digit."""
    from sklearn.datasets import load_digits

    pixels = load_digits().data
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow([f"p{i}" for i in range(64)] + ["digit"])
    for i in indices:
        writer.writerow([int(v) for v in pixels[i]] + [int(labels[i])])
    return out.getvalue().encode()


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    from sklearn.datasets import load_digits

    folder = tmp_path_factory.mktemp("digits")
    target = load_digits().target
    rng = np.random.default_rng(0)
    order = rng.permutation(len(target))
    upstream, downstream = order[:1000], order[1000:1400]
    shuffled = target.copy()
    shuffled[upstream] = rng.permutation(shuffled[upstream])
    return {
        "folder": folder,
        "real": source(
            write(folder / "up_real.csv", digits_csv(upstream, target)),
            "tabular_classification",
            label_column="digit",
        ),
        "noise": source(
            write(folder / "up_noise.csv", digits_csv(upstream, shuffled)),
            "tabular_classification",
            label_column="digit",
        ),
        "down400": source(
            write(folder / "down400.csv", digits_csv(downstream, target)),
            "tabular_classification",
            label_column="digit",
        ),
        "down60": source(
            write(folder / "down60.csv", digits_csv(downstream[:60], target)),
            "tabular_classification",
            label_column="digit",
        ),
    }


def upstream_model(digits: dict[str, object], name: str) -> BaseModelSource:
    trained = run("mlp", "full", digits[name], epochs=40, validation_split=0.0)  # type: ignore[arg-type]
    weights = Path(digits["folder"]) / f"{name}.safetensors"  # type: ignore[arg-type]
    save_weights(weights, trained.state, trained.spec)
    return BaseModelSource(id=f"mdl_{name}", spec=trained.spec, weights_path=weights)


def study(base: BaseModelSource, dataset: DatasetSource) -> StudyResult:
    hyperparameters = {
        **default_hyperparameters("mlp", "linear_probe"),
        "epochs": 20,
        "validation_split": 0.3,
    }
    config = FinetuneConfig(
        job_id="job_t",
        method="linear_probe",
        base=base,
        train=dataset,
        hyperparameters=hyperparameters,
        seed=1,
    )  # type: ignore[arg-type]
    return run_study(config, ListReporter(), seeds=SEEDS, baseline=True)


def test_negative_transfer_is_flagged_for_an_upstream_trained_on_shuffled_labels(
    digits: dict[str, object],
) -> None:
    report = study(upstream_model(digits, "noise"), digits["down400"]).report  # type: ignore[arg-type]
    assert report is not None
    assert report["negative_transfer"] is True
    assert report["gain"]["val_accuracy"]["mean"] < -report["spread"]
    assert report["summary"].startswith("Negative transfer")


def test_transfer_that_helps_is_not_flagged_and_every_field_agrees(digits: dict[str, object]) -> None:
    result = study(upstream_model(digits, "real"), digits["down60"])  # type: ignore[arg-type]
    report = result.report
    assert report is not None
    assert report["negative_transfer"] is False
    assert report["gain"]["val_accuracy"]["mean"] > report["spread"] > 0
    assert report["summary"].startswith("Transfer helped")
    assert report["seeds"] == SEEDS

    transferred, scratch = report["transferred"], report["scratch"]
    for arm in (transferred, scratch):
        assert len(arm["val_accuracy"]["values"]) == len(SEEDS)
        assert arm["val_accuracy"]["mean"] == pytest.approx(np.mean(arm["val_accuracy"]["values"]))
        assert arm["train_val_gap"]["values"] == pytest.approx(
            [
                t - v
                for t, v in zip(arm["train_accuracy"]["values"], arm["val_accuracy"]["values"], strict=True)
            ]
        )
    gains = [
        t - s
        for t, s in zip(transferred["val_accuracy"]["values"], scratch["val_accuracy"]["values"], strict=True)
    ]
    assert report["gain"]["val_accuracy"]["values"] == pytest.approx(gains)
    assert report["budget"]["epochs"] == 20
    assert (
        report["budget"]["transferred"]["method"] == "linear_probe"
        and report["budget"]["scratch"]["method"] == "full"
    )

    labels = report["confusion_matrix"]["labels"]
    assert labels == [str(d) for d in range(10)]
    for arm in ("transferred", "scratch"):
        matrix = np.array(report["confusion_matrix"][arm])
        assert matrix.sum() == report["validation_examples"] * len(SEEDS)
        for i, label in enumerate(labels):
            if matrix[i].sum():
                assert report["per_class"][label][arm] == pytest.approx(matrix[i, i] / matrix[i].sum())
    accuracy_from_matrix = np.trace(np.array(report["confusion_matrix"]["transferred"])) / (
        report["validation_examples"] * len(SEEDS)
    )
    assert accuracy_from_matrix == pytest.approx(transferred["val_accuracy"]["mean"])

    for arm in ("transferred", "scratch"):
        curves = report["learning_curves"][arm]
        assert len(curves) == len(SEEDS)
        assert [len(curve) for curve in curves] == report[arm]["epochs_run"]
    for seed_index, row in enumerate(report["convergence"]["per_seed"]):
        scratch_curve = report["learning_curves"]["scratch"][seed_index]
        assert row["scratch_best_val_accuracy"] == max(r["val_accuracy"] for r in scratch_curve)
        reached = row["transferred_epochs_to_reach_it"]
        assert reached is not None
        assert (
            report["learning_curves"]["transferred"][seed_index][reached - 1]["val_accuracy"]
            >= row["scratch_best_val_accuracy"]
        )
    assert report["convergence"]["speedup"] > 1

    # The job's own run is the first seed's transferred one.
    assert result.result.metrics["val_accuracy"] == transferred["val_accuracy"]["values"][0]

    png = render_png(report)
    assert png.startswith(b"\x89PNG")
    image = Image.open(io.BytesIO(png))
    assert image.size[0] > 1000 and image.size[1] > 300


def test_a_better_parent_arm_is_flagged_and_as_is_is_measured_on_the_same_examples(
    digits: dict[str, object],
) -> None:
    noise, real = upstream_model(digits, "noise"), upstream_model(digits, "real")
    hyperparameters = {
        **default_hyperparameters("mlp", "linear_probe"),
        "epochs": 20,
        "validation_split": 0.3,
    }
    config = FinetuneConfig(
        job_id="job_t", method="linear_probe", base=noise, train=digits["down400"],  # type: ignore[arg-type]
        hyperparameters=hyperparameters, seed=1,  # type: ignore[arg-type]
    )  # fmt: skip
    arms = [Arm(name="parent", kind="parent", base=real), Arm(name="as_is", kind="as_is")]
    report = run_study(config, ListReporter(), seeds=[1, 2], baseline=True, arms=arms).report
    assert report is not None
    parent, as_is = report["arms"]["parent"], report["arms"]["as_is"]
    # The parent (an upstream trained on the real labels) beats the job's upstream trained on shuffled ones.
    assert parent["negative_transfer"] is True, parent["summary"]
    assert parent["held_out"]["interval_95"][1] < 0
    assert parent["accuracy"] > parent["transferred_accuracy"]
    assert parent["summary"].startswith("Negative transfer") and "Against parent" in report["summary"]
    assert report["budget"]["parent"] == {"base_model": "mdl_real", "method": "linear_probe"}
    # as_is: the shuffled head as it is, on the very validation examples the transferred model was measured on.
    assert as_is["held_out"]["examples"] == report["validation_examples"]
    assert as_is["transferred_accuracy"] == pytest.approx(report["transferred"]["val_accuracy"]["mean"])
    assert as_is["accuracy"] < 0.3 and as_is["negative_transfer"] is False


def test_named_arms_take_part_in_the_cross_validation(digits: dict[str, object]) -> None:
    real = upstream_model(digits, "real")
    hyperparameters = {**default_hyperparameters("mlp", "linear_probe"), "epochs": 10}
    config = FinetuneConfig(
        job_id="job_t", method="linear_probe", base=real, train=digits["down60"],  # type: ignore[arg-type]
        hyperparameters=hyperparameters, seed=1,  # type: ignore[arg-type]
    )  # fmt: skip
    arms = [
        Arm(name="as_is", kind="as_is"),
        Arm(name="mdl_noise", kind="model", base=upstream_model(digits, "noise")),
    ]
    report = run_study(config, ListReporter(), seeds=[1], baseline=True, folds=3, arms=arms).report
    assert report is not None and report["measured_on"]["kind"] == "cross_validation"
    for name in ("as_is", "mdl_noise"):
        assert report["arms"][name]["held_out"]["examples"] == 60
        assert report["arms"][name]["transferred_accuracy"] == pytest.approx(
            report["held_out"]["transferred_accuracy"]
        )
    # The real upstream as it is already names most digits; the shuffled one fine-tuned the same way does not.
    assert report["arms"]["as_is"]["accuracy"] > 0.5
    assert report["arms"]["mdl_noise"]["kind"] == "model"
