"""Semi-supervised fine-tuning: unlabelled examples train through confident predictions on a weak view
that become targets of a strong view; their labels, if the file has any, are never read."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from graft.defaults import SEMI_SUPERVISED_DEFAULTS, resolve_hyperparameters
from graft.jobspec import Hyperparameters
from graft.sources import BaseModelSource, DatasetSource
from graft.spec import ModelSpec
from tests.helpers import digits_zip, shifted_table_csv, write
from tests.unit.test_finetune_recipe import ListReporter, source
from workers.recipes.semi_supervised import SemiSupervisedConfig, SemiSupervisedRecipe
from workers.recipes.study import recipe_for

TABULAR = "tabular_classification"


def config(
    train: DatasetSource, unlabeled: DatasetSource, architecture: str, **hp: object
) -> SemiSupervisedConfig:
    hyperparameters = resolve_hyperparameters(architecture, "full", dict(hp), train_examples=40)
    return SemiSupervisedConfig(
        job_id="job_test",
        seed=0,
        method="full",
        base=BaseModelSource(id=architecture, spec=ModelSpec.for_builtin(architecture), pretrained=False),
        train=train,
        hyperparameters=Hyperparameters.model_validate(hyperparameters),
        save_checkpoints=False,
        unlabeled=unlabeled,
        **SEMI_SUPERVISED_DEFAULTS,  # type: ignore[arg-type]
    )


def test_the_unlabelled_datasets_labels_are_never_read(tmp_path: Path) -> None:
    train = source(write(tmp_path / "train.csv", shifted_table_csv(40, domain="target")), TABULAR)
    variants = {
        "none": shifted_table_csv(200, domain="target", seed=3, with_labels=False),
        "labelled": shifted_table_csv(200, domain="target", seed=3),
        "wrong": shifted_table_csv(200, domain="target", seed=3, wrong_labels=True),
    }
    states = {}
    for name, data in variants.items():
        unlabeled = source(write(tmp_path / f"{name}.csv", data), TABULAR)
        reporter = ListReporter()
        recipe = recipe_for(config(train, unlabeled, "mlp", epochs=5), reporter)
        assert isinstance(recipe, SemiSupervisedRecipe)
        result = recipe.run()
        states[name] = result.state
        assert "pseudo_label_share" in result.history[-1]
        assert 0 <= result.history[-1]["pseudo_label_share"] <= 1
        assert any("Semi-supervised: 200 unlabelled examples" in e for e in reporter.events)
    for name in ("labelled", "wrong"):
        assert all(torch.equal(states["none"][k], states[name][k]) for k in states["none"]), name


def test_images_train_on_a_weak_and_a_strong_view_of_the_unlabelled_ones(tmp_path: Path) -> None:
    train = source(
        write(tmp_path / "few.zip", digits_zip(20, classes=(0, 1), seed=1)), "image_classification"
    )
    unlabeled = source(
        write(tmp_path / "more.zip", digits_zip(60, classes=(0, 1), seed=2, offset=20)),
        "image_classification",
    )
    recipe = SemiSupervisedRecipe(config(train, unlabeled, "resnet-small", epochs=3), ListReporter())
    recipe.setup()
    assert recipe.weak is not None and recipe.strong is not None
    batch = recipe.unlabeled_inputs.batch(list(range(8))).to(recipe.device)
    weak, strong = recipe.weak(batch), recipe.strong(batch)
    # Both views keep the batch's shape and differ from it and from each other (random crops, cutout).
    assert weak.shape == strong.shape == batch.shape
    assert not torch.equal(weak, batch) and not torch.equal(strong, weak)
    result = recipe.train()
    assert result.history[-1]["pseudo_label_share"] >= 0
    # Validation and serving see the shared preprocessing alone: the recipe's model predicts the batch as is.
    recipe.model.eval()
    with torch.no_grad():
        assert torch.equal(recipe.model(batch), recipe.model(batch))


@pytest.mark.parametrize("threshold", [0.999999])
def test_no_confident_prediction_means_no_unlabelled_loss(tmp_path: Path, threshold: float) -> None:
    train = source(write(tmp_path / "train.csv", shifted_table_csv(40, domain="target")), TABULAR)
    unlabeled = source(
        write(tmp_path / "u.csv", shifted_table_csv(100, domain="target", with_labels=False)), TABULAR
    )
    recipe = SemiSupervisedRecipe(
        config(train, unlabeled, "mlp", epochs=1).model_copy(update={"confidence_threshold": threshold}),
        ListReporter(),
    )
    recipe.setup()
    features = torch.zeros(4, recipe.model.feature_dim)
    loss = recipe.extra_loss(features, progress=1.0)
    assert loss is not None and float(loss.detach()) == 0.0
    assert recipe.pseudo_kept == 0 and recipe.pseudo_seen == 4 * SEMI_SUPERVISED_DEFAULTS["unlabeled_ratio"]
