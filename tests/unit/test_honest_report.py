"""The transfer report measured on held-out examples: a paired interval that covers a planted gain, "too
few to tell" when it cannot, k-fold cross-validation over all labels, and an evaluation dataset."""

from __future__ import annotations

import numpy as np
import pytest

from graft.defaults import default_hyperparameters, report_folds
from graft.report import held_out_verdict, paired_comparison
from graft.sources import BaseModelSource, DatasetSource
from ml.data import label_indices, read_labels, stratified_folds
from ml.weights import save_weights
from tests.helpers import digits_table_csv, write
from tests.unit.test_finetune_recipe import ListReporter, run, source
from workers.recipes.finetune import FinetuneConfig
from workers.recipes.study import run_study


def planted(
    rng: np.random.Generator, n: int, p_scratch: float, gain: float, seeds: int
) -> tuple[list[list[int]], list[list[int]]]:
    """Per-example correctness of two arms whose true accuracies differ by `gain`: each example has a
    difficulty both arms share (paired data), and each seed draws again."""
    difficulty = rng.uniform(0, 1, n)
    scratch = [
        (rng.uniform(0, 1, n) * 0.5 + difficulty * 0.5 < p_scratch).astype(int).tolist() for _ in range(seeds)
    ]
    transferred = [
        (rng.uniform(0, 1, n) * 0.5 + difficulty * 0.5 < p_scratch + gain).astype(int).tolist()
        for _ in range(seeds)
    ]
    return transferred, scratch


def test_a_planted_gain_is_seen() -> None:
    """A 10-point gain on 400 paired examples: the interval excludes zero nearly always."""
    rng = np.random.default_rng(0)
    conclusive, trials = 0, 300
    for _ in range(trials):
        transferred, scratch = planted(rng, 400, 0.55, 0.10, seeds=2)
        comparison = paired_comparison(transferred, scratch)
        conclusive += comparison["conclusive"] and comparison["interval_95"][0] > 0
    assert conclusive / trials > 0.95


def test_the_interval_holds_the_true_gain_across_samples() -> None:
    """Drawn again and again, the 95% interval holds the population's gain about 95% of the time."""
    rng = np.random.default_rng(1)
    hits, trials = 0, 400
    for _ in range(trials):
        n = 120
        both = rng.uniform(0, 1, n)
        scratch = [(both < 0.6).astype(int).tolist()]
        flips = rng.uniform(0, 1, n)
        # Transfer fixes 30% of scratch's errors and breaks 10% of its successes: true gain 0.3*0.4 - 0.1*0.6.
        transferred = [
            [
                1 if (s == 0 and f < 0.3) or (s == 1 and f >= 0.1) else 0
                for s, f in zip(scratch[0], flips, strict=True)
            ]
        ]
        low, high = paired_comparison(transferred, scratch)["interval_95"]
        hits += low <= 0.06 <= high
    assert 0.88 <= hits / trials <= 0.99


def test_too_few_examples_say_so() -> None:
    comparison = paired_comparison([[1, 0, 1, 1, 0, 1, 0, 1, 1]], [[1, 1, 0, 1, 0, 0, 1, 1, 0]])
    summary, negative = held_out_verdict(
        comparison, {"kind": "validation", "examples": 9}, "training from scratch"
    )
    assert summary.startswith("Too few examples to tell") and "on 9 validation examples" in summary
    assert not negative and not comparison["conclusive"]
    worse = paired_comparison([[0] * 150 + [1] * 50], [[1] * 150 + [0] * 50])
    summary, negative = held_out_verdict(
        worse, {"kind": "evaluation_dataset", "dataset": "ds_x", "examples": 200}, "x"
    )
    assert negative and summary.startswith("Negative transfer") and "ds_x" in summary
    with pytest.raises(ValueError):
        paired_comparison([[1, 0]], [[1]])


def test_folds_are_stratified_and_cover_every_example() -> None:
    labels = label_indices([c for c in "aaaaabbbbbbbbbbcc"], ["a", "b", "c"])
    folds = stratified_folds(labels, 5, seed=3)
    assert sorted(i for fold in folds for i in fold) == list(range(len(labels)))
    assert all(sum(1 for i in fold if labels[i] == 1) == 2 for fold in folds)  # 10 b's, 2 per fold
    assert report_folds({"a": 5, "b": 5}, 0.1) == 5  # 1 validation example per class: cross-validate
    assert report_folds({"a": 3, "b": 50}, 0.1) == 3  # no more folds than the smallest class has
    assert report_folds({"a": 400, "b": 400}, 0.1) == 0  # 40 per class: the split will do
    assert report_folds({"a": 1, "b": 50}, 0.1) == 0


@pytest.fixture(scope="module")
def tables(tmp_path_factory: pytest.TempPathFactory) -> tuple[BaseModelSource, DatasetSource, DatasetSource]:
    folder = tmp_path_factory.mktemp("report")
    source_rows = source(
        write(folder / "up.csv", digits_table_csv(range(4), 200)),
        "tabular_classification",
        label_column="digit",
    )
    upstream = run("mlp", "full", source_rows, epochs=15, validation_split=0.0)
    weights = folder / "up.safetensors"
    save_weights(weights, upstream.state, upstream.spec)
    base = BaseModelSource(id="mlp upstream", spec=upstream.spec, weights_path=weights, weights_sha256="u")
    few = source(
        write(folder / "few.csv", digits_table_csv(range(4), 24, offset=200)),
        "tabular_classification",
        label_column="digit",
    )
    held = source(
        write(folder / "held.csv", digits_table_csv(range(4), 300, offset=224)),
        "tabular_classification",
        label_column="digit",
    )
    return base, few, held


def config_for(base: BaseModelSource, train: DatasetSource, **update: object) -> FinetuneConfig:
    hp = {**default_hyperparameters("mlp", "full", learned=True), "epochs": 10}
    return FinetuneConfig(
        job_id="j", method="full", base=base, train=train, seed=0, hyperparameters=hp, **update
    )  # type: ignore[arg-type]


def test_cross_validated_report_over_all_labels(
    tables: tuple[BaseModelSource, DatasetSource, DatasetSource],
) -> None:
    base, few, _ = tables
    reporter = ListReporter()
    study = run_study(config_for(base, few), reporter, seeds=[1, 2], baseline=True, folds=3)
    report = study.report
    assert report is not None
    assert report["measured_on"] == {"kind": "cross_validation", "folds": 3, "examples": 24}
    held = report["held_out"]
    assert held["examples"] == 24 and held["interval_95"][0] <= held["gain"] <= held["interval_95"][1]
    assert "3-fold cross-validation" in report["summary"] and "all 24 labelled examples" in report["summary"]
    assert len(report["transferred"]["val_accuracy"]["values"]) == 6  # 2 seeds x 3 folds
    # The job's own model trained on every label.
    assert any("Data: 24 training and 0 validation examples" in e for e in reporter.events)
    assert study.result.validation_correct == []
    assert len(read_labels(few)) == 24


def test_report_on_an_evaluation_dataset(
    tables: tuple[BaseModelSource, DatasetSource, DatasetSource],
) -> None:
    base, few, held = tables
    study = run_study(config_for(base, few, evaluation=held), ListReporter(), seeds=[1], baseline=True)
    report = study.report
    assert report is not None
    assert report["measured_on"] == {"kind": "evaluation_dataset", "dataset": held.id, "examples": 300}
    assert f"on 300 held-out examples of {held.id}" in report["summary"]
    assert study.result.held_out is not None and len(study.result.held_out["correct"]) == 300
    assert study.result.metrics["eval_accuracy"] == pytest.approx(np.mean(study.result.held_out["correct"]))
    assert report["held_out"]["transferred_accuracy"] == pytest.approx(study.result.metrics["eval_accuracy"])
