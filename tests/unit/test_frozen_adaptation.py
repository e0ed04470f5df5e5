"""Adapt and distill with a frozen backbone: features from the cache, a feature adapter and a head over them.

The case is a real shift of short texts (film reviews -> product reviews) on the pretrained MiniLM built-in."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bench.common import review_rows
from graft.defaults import ADAPTATION_DEFAULTS, ADAPTER_HIDDEN, resolve_hyperparameters
from graft.jobspec import Hyperparameters
from graft.sources import BaseModelSource, DatasetSource
from graft.spec import ModelSpec
from ml.data import load_inputs
from ml.features import extract_features
from ml.networks import build_model
from ml.weights import load_model, save_weights
from tests.helpers import product_rows, text_csv, write
from tests.unit.test_finetune_recipe import ListReporter, source
from workers.recipes.adapt import AdaptConfig, AdaptRecipe, run_adaptation
from workers.recipes.distill import DistillConfig, run_distillation
from workers.recipes.finetune import FinetuneConfig, FinetuneRecipe

TEXT = "text_classification"
MINILM = BaseModelSource(id="minilm-l6", spec=ModelSpec.for_builtin("minilm-l6"), pretrained=True)


@pytest.fixture(scope="module")
def texts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, DatasetSource]:
    folder = tmp_path_factory.mktemp("text-shift")
    target_rows = product_rows(240, seed=6)
    return {
        "source": source(write(folder / "films.csv", text_csv(review_rows(240, seed=5))), TEXT),
        # The target's labels are in the file but never read (only inputs are): they are here to be ignored.
        "target": source(write(folder / "products.csv", text_csv(target_rows)), TEXT),
        "evaluation": source(write(folder / "products-eval.csv", text_csv(product_rows(400, seed=7))), TEXT),
    }


def frozen_config(texts: dict[str, DatasetSource], cache: Path) -> AdaptConfig:
    hyperparameters = resolve_hyperparameters(
        "minilm-l6", "linear_probe", {}, train_examples=216, fine_tunes_learned_weights=True
    )
    return AdaptConfig(
        job_id="job_test",
        seed=0,
        method="linear_probe",
        base=MINILM,
        train=texts["source"],
        target=texts["target"],
        evaluation=texts["evaluation"],
        hyperparameters=Hyperparameters.model_validate(hyperparameters),
        save_checkpoints=False,
        adapter=ADAPTER_HIDDEN,
        feature_cache_dir=cache,
        **ADAPTATION_DEFAULTS,
    )


@pytest.fixture(scope="module")
def frozen_study(texts: dict[str, DatasetSource], tmp_path_factory: pytest.TempPathFactory) -> tuple:
    reporter = ListReporter()
    config = frozen_config(texts, tmp_path_factory.mktemp("cache"))
    return run_adaptation(config, reporter, methods=["coral", "pseudo_label"]), reporter, config


def test_a_frozen_backbone_adapts_text_to_a_new_domain(frozen_study: tuple) -> None:
    study, reporter, _ = frozen_study
    report = study.report
    source_only = report["methods"]["source_only"]["target_accuracy"]["mean"]
    best = report["best_method"]
    assert best != "source_only", report["summary"]
    assert report["methods"][best]["target_accuracy"]["mean"] > source_only + 0.03, report["summary"]
    # Each dataset's backbone features were computed once: every later run read them from the cache.
    computed = [e for e in reporter.events if "Computed backbone features" in e]
    reused = [e for e in reporter.events if "Reused cached backbone features" in e]
    assert len(computed) == 3, computed  # source (training and validation share its pass), target, evaluation
    assert len(reused) >= 2 * 3, reused


def test_the_frozen_backbone_stays_as_it_was_and_the_adapter_serves_the_target(
    frozen_study: tuple, texts: dict[str, DatasetSource], tmp_path: Path
) -> None:
    study, _, _ = frozen_study
    result = study.primary.result
    assert result.spec.options["adapter"] == ADAPTER_HIDDEN
    pretrained = build_model(ModelSpec.for_builtin("minilm-l6"), pretrained=True).state_dict()
    backbone = {k: v for k, v in result.state.items() if k.startswith("backbone.")}
    assert backbone and all(torch.equal(v.cpu(), pretrained[k]) for k, v in backbone.items())
    assert any(k.startswith("adapter.up.") for k in result.state)
    # The served model standardises features with the target's statistics (AdaBN at the feature layer).
    model = build_model(result.spec, pretrained=False)
    model.load_state_dict(result.state)
    inputs, _ = load_inputs(texts["target"], result.spec)
    features = extract_features(model, inputs, torch.device("cpu"), None, backbone_only=True)
    assert torch.allclose(result.state["adapter.mean"].cpu(), features.mean(dim=0), atol=1e-5)
    # Saved as safetensors and loaded back from its spec, it predicts what the run measured.
    path = tmp_path / "adapted.safetensors"
    save_weights(path, {k: v.detach().cpu().contiguous() for k, v in result.state.items()}, result.spec)
    loaded = load_model(path).eval()
    evaluation, labels = load_inputs(texts["evaluation"], result.spec)
    assert labels is not None
    with torch.no_grad():
        predicted = loaded(evaluation.batch(list(range(len(evaluation))))).argmax(dim=1)
    classes = result.spec.classes
    accuracy = float((predicted == torch.tensor([classes.index(y) for y in labels])).float().mean())
    assert accuracy == pytest.approx(result.held_out["accuracy"] if result.held_out else accuracy)
    primary = study.report["methods"][study.primary.method]["target_accuracy"]["mean"]
    assert accuracy == pytest.approx(primary, abs=1e-6)


def test_source_only_with_a_frozen_backbone_keeps_the_sources_statistics(
    texts: dict[str, DatasetSource], tmp_path: Path
) -> None:
    config = frozen_config(texts, tmp_path).model_copy(update={"adaptation": "source_only"})
    recipe = AdaptRecipe(config, ListReporter())
    result = recipe.run()
    assert torch.allclose(
        result.state["adapter.mean"].cpu(), recipe.train_features.mean(dim=0).cpu(), atol=1e-5
    )


def test_a_frozen_student_learns_from_the_teacher_over_cached_features(
    texts: dict[str, DatasetSource], tmp_path: Path
) -> None:
    # A teacher: MiniLM fine-tuned by a linear probe on the film reviews.
    hyperparameters = resolve_hyperparameters(
        "minilm-l6", "linear_probe", {}, train_examples=216, fine_tunes_learned_weights=True
    )
    teacher = FinetuneRecipe(
        FinetuneConfig(
            job_id="job_teacher",
            method="linear_probe",
            base=MINILM,
            train=texts["source"],
            hyperparameters=Hyperparameters.model_validate(hyperparameters),
            save_checkpoints=False,
        ),
        ListReporter(),
    ).run()
    teacher_path = tmp_path / "teacher.safetensors"
    save_weights(
        teacher_path, {k: v.detach().cpu().contiguous() for k, v in teacher.state.items()}, teacher.spec
    )
    student_spec = ModelSpec.for_builtin("minilm-l6").model_copy(update={"options": {"layers": 2}})
    reporter = ListReporter()
    study = run_distillation(
        DistillConfig(
            job_id="job_distill",
            method="linear_probe",
            base=BaseModelSource(id="minilm-l6 student", spec=student_spec, pretrained=True),
            teacher=BaseModelSource(
                id="teacher", spec=teacher.spec, weights_path=teacher_path, weights_sha256="teacher"
            ),
            train=texts["source"],
            hyperparameters=Hyperparameters.model_validate(hyperparameters),
            save_checkpoints=False,
            adapter=ADAPTER_HIDDEN,
            feature_cache_dir=tmp_path / "cache",
        ),
        reporter,
    )
    assert study.result.spec.options == {"layers": 2, "adapter": ADAPTER_HIDDEN}
    trained = {k for k in study.result.state if not k.startswith("backbone.")}
    assert {"head.weight", "adapter.up.weight", "adapter.mean"} <= trained
    # The student's two layers are the pretrained encoder's bottom two, untouched.
    pretrained = build_model(student_spec, pretrained=True).state_dict()
    assert all(
        torch.equal(study.result.state[k].cpu(), v)
        for k, v in pretrained.items()
        if k.startswith("backbone.")
    )
    assert study.report["distilled_student"]["accuracy"] > 0.6, study.report["summary"]
    assert any("Reused cached backbone features" in e for e in reporter.events)
