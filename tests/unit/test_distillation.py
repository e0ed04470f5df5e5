"""Distillation's pieces: the student architectures' size options and the loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from graft.spec import ModelSpec
from ml.networks import build_model, count_parameters, minilm_pretrained_state
from workers.recipes.distill import distillation_report


def test_a_shallower_minilm_keeps_the_bottom_pretrained_layers() -> None:
    spec = ModelSpec.for_builtin("minilm-l6").model_copy(update={"options": {"layers": 2}})
    model = build_model(spec, pretrained=True)
    encoder = model.backbone.encoder  # type: ignore[union-attr]
    assert len(encoder.encoder.layer) == 2
    package = minilm_pretrained_state()
    state = encoder.state_dict()
    assert torch.equal(
        state["encoder.layer.1.attention.self.query.weight"],
        package["encoder.layer.1.attention.self.query.weight"],
    )
    assert not any(k.startswith("encoder.layer.2.") for k in state)
    full = build_model(ModelSpec.for_builtin("minilm-l6"), pretrained=False)
    assert count_parameters(model) < 0.8 * count_parameters(full)


def test_cnn_small_width_sets_its_channels_and_features() -> None:
    spec = ModelSpec.for_builtin("cnn-small").model_copy(
        update={"options": {"width": 8}, "classes": ["a", "b"]}
    )
    model = build_model(spec, pretrained=False)
    assert spec.feature_dim == 32 and model.feature_dim == 32
    assert model(torch.zeros(2, 3, 64, 64)).shape == (2, 2)
    default = build_model(ModelSpec.for_builtin("cnn-small").with_classes(["a", "b"]), pretrained=False)
    assert count_parameters(model) < count_parameters(default) / 10


def test_the_report_measures_the_gap_recovered() -> None:
    def arm(accuracy: float, parameters: int, latency: float) -> dict[str, float]:
        return {
            "accuracy": accuracy,
            "macro_f1": accuracy,
            "agreement_with_teacher": accuracy,
            "num_parameters": parameters,
            "checkpoint_bytes": parameters * 4,
            "cpu_latency_ms": latency,
        }

    report = distillation_report(
        arm(0.9, 1000, 10.0),
        arm(0.7, 100, 2.0),
        arm(0.85, 100, 2.0),
        evaluation_examples=50,
        hyperparameters={},
        curves={},
    )
    assert abs(report["gap_recovered"] - 0.75) < 1e-9
    assert report["compression"] == {"parameters": 10.0, "checkpoint_bytes": 10.0, "cpu_latency": 5.0}
    assert "75% of the gap" in report["summary"]
    no_gap = distillation_report(
        arm(0.7, 10, 1.0),
        arm(0.7, 1, 1.0),
        arm(0.7, 1, 1.0),
        evaluation_examples=5,
        hyperparameters={},
        curves={},
    )
    assert no_gap["gap_recovered"] is None and "no gap to recover" in no_gap["summary"]


def test_kl_term_vanishes_when_the_student_matches_the_teacher() -> None:
    from workers.recipes.distill import DistillRecipe

    recipe = DistillRecipe.__new__(DistillRecipe)
    logits = torch.randn(4, 3)
    recipe.teacher_logits = logits.clone()
    recipe.train_positions = [0, 1, 2, 3]
    recipe.labelled = False
    recipe.config = type("C", (), {"temperature": 2.0, "alpha": 0.5})()  # type: ignore[assignment]
    target = torch.tensor([0, 1, 2, 0])
    assert float(recipe.training_loss(logits, target, [0, 1, 2, 3])) < 1e-6
    assert float(recipe.training_loss(torch.zeros(4, 3), target, [0, 1, 2, 3])) > 0.01
    recipe.labelled = True
    recipe.config = type("C", (), {"temperature": 2.0, "alpha": 1.0})()  # type: ignore[assignment]
    assert torch.isclose(recipe.training_loss(logits, target, [0, 1, 2, 3]), F.cross_entropy(logits, target))
