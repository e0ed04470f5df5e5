"""Domain adaptation: the losses and diagnostics on their own, and the adaptation study on a planted shift."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import pytest
import torch

from graft.defaults import resolve_hyperparameters
from graft.jobspec import Hyperparameters
from graft.report import render_png
from graft.sources import BaseModelSource, DatasetSource
from graft.spec import ModelSpec
from ml import alignment as adaptation
from tests.helpers import shifted_table_csv, write
from tests.unit.test_finetune_recipe import ListReporter, source
from workers.recipes.adapt import AdaptationStudy, AdaptConfig, run_adaptation

TABULAR = "tabular_classification"


def test_gradient_reversal_flips_and_scales_the_gradient() -> None:
    x = torch.ones(3, requires_grad=True)
    (adaptation.reverse_gradient(x, 0.5) * torch.tensor([1.0, 2.0, 3.0])).sum().backward()
    assert x.grad is not None
    assert torch.allclose(x.grad, torch.tensor([-0.5, -1.0, -1.5]))


def test_dann_weight_rises_from_zero_to_almost_one() -> None:
    weights = [adaptation.dann_weight(p / 10) for p in range(11)]
    assert weights[0] == 0.0
    assert all(a < b for a, b in itertools.pairwise(weights))
    assert weights[-1] > 0.99


def test_discrepancies_are_small_within_a_domain_and_large_across_a_shift() -> None:
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(200, 8, generator=generator)
    b = torch.randn(200, 8, generator=generator)
    shifted = torch.randn(200, 8, generator=generator) * 3 + 2
    assert adaptation.mmd(a, b) < 0.2 * adaptation.mmd(a, shifted)
    assert adaptation.coral_loss(a, b) < 0.1 * adaptation.coral_loss(a, shifted)
    assert adaptation.a_distance(a, b) < 0.6
    assert adaptation.a_distance(a, shifted) > 1.6


def test_mcc_prefers_confident_distinct_predictions_to_confused_ones() -> None:
    confident = torch.eye(4).repeat(8, 1) * 10
    confused = torch.zeros(32, 4)
    assert adaptation.mcc_loss(confident) < adaptation.mcc_loss(confused)


def test_pseudo_labels_train_only_confident_predictions() -> None:
    logits = torch.tensor([[5.0, 0.0], [0.1, 0.0]], requires_grad=True)
    loss = adaptation.pseudo_label_loss(logits, threshold=0.9)
    loss.backward()
    assert logits.grad is not None
    assert logits.grad[1].abs().sum() == 0  # 52% confident: not a label
    assert logits.grad[0].abs().sum() > 0
    nothing = adaptation.pseudo_label_loss(torch.zeros(3, 2, requires_grad=True), threshold=0.9)
    assert float(nothing.detach()) == 0.0


def test_diagnostics_need_no_labels() -> None:
    logits = torch.tensor([[4.0, 0.0], [4.0, 0.0], [0.0, 4.0], [0.0, 0.0]])
    assert adaptation.class_balance(logits, ["a", "b"]) == {"a": 0.75, "b": 0.25}
    assert 0 < adaptation.prediction_entropy(logits) < math.log(2)


@pytest.fixture(scope="module")
def shift(tmp_path_factory: pytest.TempPathFactory) -> dict[str, DatasetSource]:
    folder = tmp_path_factory.mktemp("shift")

    def table(name: str, data: bytes) -> DatasetSource:
        return source(write(folder / f"{name}.csv", data), TABULAR)

    return {
        "source": table("source", shifted_table_csv(300, domain="source")),
        "target": table("target", shifted_table_csv(300, domain="target", with_labels=False)),
        "target_labelled": table("target_labelled", shifted_table_csv(300, domain="target")),
        "target_wrong": table("target_wrong", shifted_table_csv(300, domain="target", wrong_labels=True)),
        "evaluation": table("evaluation", shifted_table_csv(200, domain="target", seed=7)),
    }


def study(
    shift: dict[str, DatasetSource], methods: list[str], *, target: str = "target", evaluation: bool = True
) -> AdaptationStudy:
    hyperparameters = resolve_hyperparameters("mlp", "full", {}, train_examples=270)
    config = AdaptConfig(
        job_id="job_test",
        seed=0,
        method="full",
        base=BaseModelSource(id="mlp", spec=ModelSpec.for_builtin("mlp"), pretrained=False),
        train=shift["source"],
        target=shift[target],
        evaluation=shift["evaluation"] if evaluation else None,
        hyperparameters=Hyperparameters.model_validate(hyperparameters),
        save_checkpoints=False,
    )
    return run_adaptation(config, ListReporter(), methods=methods)


def test_on_a_planted_shift_adaptation_beats_source_only(
    shift: dict[str, DatasetSource], tmp_path: Path
) -> None:
    result = study(shift, ["dann", "coral", "mmd", "mcc", "pseudo_label"])
    report = result.report
    assert report["kind"] == "adaptation"
    assert list(report["methods"]) == ["source_only", "dann", "coral", "mmd", "mcc", "pseudo_label"]
    source_only = report["methods"]["source_only"]["target_accuracy"]["mean"]
    assert source_only < 0.65  # the shortcut feature misleads the source-only model on the target
    assert report["helped"], report["summary"]
    best = report["best_method"]
    assert best != "source_only" and report["methods"][best]["target_accuracy"]["mean"] > source_only + 0.15
    for method, entry in report["methods"].items():
        assert 0 <= entry["a_distance"]["mean"] <= 2, method
        assert sum(entry["class_balance"].values()) == pytest.approx(1.0)
        assert entry["learning_curves"][0], method
    # The aligned methods bring the domains' features closer than source_only's.
    assert (
        min(report["methods"][m]["a_distance"]["mean"] for m in ("dann", "mmd"))
        < (report["methods"]["source_only"]["a_distance"]["mean"])
    )
    assert result.primary.method == "dann"
    assert render_png(report).startswith(b"\x89PNG")


def test_the_target_labels_are_never_read_in_training(shift: dict[str, DatasetSource]) -> None:
    runs = {
        target: study(shift, ["dann"], target=target, evaluation=False)
        for target in ("target", "target_labelled", "target_wrong")
    }
    reference = runs["target"].primary.result.state
    for target in ("target_labelled", "target_wrong"):
        state = runs[target].primary.result.state
        assert all(torch.equal(reference[k], state[k]) for k in reference), target
    report = runs["target_wrong"].report
    assert report["evaluation_labels"] is False and report["gain_over_source_only"] is None
    assert "No target labels" in report["summary"]
    assert render_png(report).startswith(b"\x89PNG")
