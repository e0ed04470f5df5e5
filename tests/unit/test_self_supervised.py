"""Self-supervised objectives: NT-Xent, the image views, swap noise, and a SimCSE run on minilm-l6."""

from __future__ import annotations

from pathlib import Path

import torch

from graft.defaults import default_hyperparameters
from graft.jobspec import Hyperparameters
from graft.sources import BaseModelSource
from graft.spec import ModelSpec
from ml.networks import minilm_pretrained_state
from tests.helpers import sentiment_rows, text_csv, write
from tests.unit.test_finetune_recipe import ListReporter, source
from workers.recipes.self_supervised import (
    SelfSupervisedConfig,
    SelfSupervisedRecipe,
    augment_images,
    nt_xent,
    swap_noise,
)


def test_nt_xent_rewards_matching_pairs() -> None:
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(16, 8, generator=generator)
    assert nt_xent(a, a + 0.01 * torch.randn(16, 8, generator=generator), 0.1) < 0.1
    assert nt_xent(a, torch.randn(16, 8, generator=generator), 0.1) > 1.0


def test_image_views_differ_but_keep_the_shape() -> None:
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(4, 3, 32, 32)
    a, b = augment_images(images, generator), augment_images(images, generator)
    assert a.shape == images.shape and not torch.allclose(a, b)


def test_swap_noise_takes_values_from_the_same_column() -> None:
    generator = torch.Generator().manual_seed(0)
    rows = torch.arange(40, dtype=torch.float32).reshape(10, 4)
    noisy = swap_noise(rows, rows, 0.5, generator)
    changed = noisy != rows
    assert 0 < int(changed.sum()) < rows.numel()
    for column in range(4):
        assert set(noisy[:, column].tolist()) <= set(rows[:, column].tolist())


def test_simcse_continues_pretraining_minilm_without_labels(tmp_path: Path) -> None:
    data = source(write(tmp_path / "texts.csv", text_csv(sentiment_rows(16))), "text_classification")
    hyperparameters = {**default_hyperparameters("minilm-l6", "self_supervised"), "batch_size": 8}
    config = SelfSupervisedConfig(
        job_id="job_test",
        base=BaseModelSource(id="minilm-l6", spec=ModelSpec.for_builtin("minilm-l6")),
        train=data,
        hyperparameters=Hyperparameters.model_validate(hyperparameters),
    )
    reporter = ListReporter()
    result = SelfSupervisedRecipe(config, reporter).run()
    assert result.spec.classes == [] and not any(k.startswith("head.") for k in result.state)
    assert len(reporter.checkpoints) == 1 and torch.isfinite(torch.tensor(result.metrics["train_loss"]))
    before = minilm_pretrained_state()["encoder.layer.0.attention.self.query.weight"]
    after = result.state["backbone.encoder.encoder.layer.0.attention.self.query.weight"]
    assert not torch.equal(before, after)
    assert any("SimCSE" in event for event in reporter.events)
