"""The inductive methods on real weights and tiny data: what trains, what stays, what is saved."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from graft.catalog import BUILTIN_MODELS
from graft.sources import BaseModelSource, CheckpointRef, DatasetSource
from graft.spec import ModelSpec
from ml import methods
from ml.networks import build_model, efficientnet_lite0_pretrained_state, minilm_package_dir
from ml.runtime import load_upstream
from ml.weights import save_weights
from tests.helpers import digits_zip, iris_csv, sentiment_rows, text_csv, write
from tests.unit.test_finetune_recipe import ListReporter, run, source, strip


@pytest.fixture(scope="module")
def reviews(tmp_path_factory: pytest.TempPathFactory) -> DatasetSource:
    path = write(tmp_path_factory.mktemp("reviews") / "reviews.csv", text_csv(sentiment_rows(40)))
    return source(path, "text_classification")


@pytest.fixture(scope="module")
def iris(tmp_path_factory: pytest.TempPathFactory) -> DatasetSource:
    return source(
        write(tmp_path_factory.mktemp("iris") / "iris.csv", iris_csv()),
        "tabular_classification",
        label_column="species",
    )


@pytest.fixture(scope="module")
def package() -> dict[str, torch.Tensor]:
    return load_file(str(minilm_package_dir() / "model.safetensors"))


def test_partial_trains_only_the_top_blocks_with_decayed_rates(
    reviews: DatasetSource, package: dict[str, torch.Tensor]
) -> None:
    reporter = ListReporter()
    result = run("minilm-l6", "partial", reviews, reporter, epochs=1, unfreeze_blocks=2, layer_lr_decay=0.5)
    for layer in range(6):
        name = f"encoder.layer.{layer}.attention.self.query.weight"
        moved = not torch.equal(result.state[f"backbone.encoder.{name}"], package[name])
        assert moved == (layer >= 4), f"layer {layer} moved={moved}"
    assert torch.equal(
        result.state["backbone.encoder.embeddings.word_embeddings.weight"],
        package["embeddings.word_embeddings.weight"],
    )
    saved = reporter.checkpoints[0]["keys"]
    assert any(k.startswith("backbone.encoder.encoder.layer.5.") for k in saved)
    assert not any(k.startswith("backbone.encoder.encoder.layer.3.") for k in saved)
    assert "head.weight" in saved

    model = build_model(ModelSpec.for_builtin("minilm-l6").with_classes(["a", "b"]), pretrained=False)
    setup = methods.configure(
        model, "partial", {"learning_rate": 1.0, "unfreeze_blocks": 2, "layer_lr_decay": 0.5}
    )
    rates = sorted((group["lr"] for group in setup.param_groups), reverse=True)
    assert rates == [1.0, 0.5, 0.25]  # head, top block, the block below it


def test_partial_keeps_frozen_batch_norm_statistics(tmp_path: Path) -> None:
    images = source(write(tmp_path / "digits.zip", digits_zip(12)), "image_classification")
    result = run(
        "efficientnet-lite0",
        "partial",
        images,
        epochs=1,
        unfreeze_blocks=1,
        validation_split=0.0,
        batch_size=6,
    )
    package = efficientnet_lite0_pretrained_state()
    for name in ("_bn0.running_mean", "_blocks.0._bn1.running_var", "_blocks.15._bn2.running_mean"):
        assert torch.equal(result.state[f"backbone.net.{name}"], package[name]), name
    assert not torch.equal(result.state["backbone.net._bn1.running_mean"], package["_bn1.running_mean"])


def test_lora_adapts_with_low_rank_updates_and_merges(
    reviews: DatasetSource, package: dict[str, torch.Tensor]
) -> None:
    reporter = ListReporter()
    result = run("minilm-l6", "lora", reviews, reporter, epochs=2, lora_rank=4, learning_rate=5e-3)
    assert result.adapter is not None and result.adapter_config is not None
    assert result.adapter_config["r"] == 4 and result.adapter_config["target_modules"] == ["query", "value"]
    assert any("lora_A" in k for k in result.adapter) and "head.weight" in result.adapter
    # The served model is the merged one: plain tensor names, query/value moved by a rank-4 update,
    # everything else exactly the package's.
    query = "encoder.layer.2.attention.self.query.weight"
    delta = result.state[f"backbone.encoder.{query}"] - package[query]
    assert 0 < int(torch.linalg.matrix_rank(delta)) <= 4
    key = "encoder.layer.2.attention.self.key.weight"
    assert torch.equal(result.state[f"backbone.encoder.{key}"], package[key])
    assert not any("lora" in k for k in result.state)
    assert reporter.checkpoints[0]["metadata"]["graft_lora"]
    assert all("lora_" in k or k.startswith("head.") for k in reporter.checkpoints[0]["keys"])


def test_lora_on_images_targets_pointwise_convolutions(tmp_path: Path) -> None:
    images = source(write(tmp_path / "digits.zip", digits_zip(10)), "image_classification")
    result = run("efficientnet-lite0", "lora", images, epochs=1, validation_split=0.0, batch_size=5)
    assert result.adapter is not None
    assert any("_project_conv.lora_A" in k for k in result.adapter)
    package = efficientnet_lite0_pretrained_state()
    assert torch.equal(result.state["backbone.net._conv_stem.weight"], package["_conv_stem.weight"])
    assert not torch.equal(
        result.state["backbone.net._blocks.3._project_conv.weight"], package["_blocks.3._project_conv.weight"]
    )


def test_early_stopping_keeps_the_best_epoch(iris: DatasetSource) -> None:
    reporter = ListReporter()
    result = run(
        "mlp", "full", iris, reporter, epochs=200, learning_rate=5e-2,
        early_stopping={"metric": "val_loss", "patience": 2, "min_delta": 0.0},
    )  # fmt: skip
    assert result.stopped_early and len(result.history) < 200
    best = min(result.history, key=lambda row: row["val_loss"])
    assert result.best_epoch == int(best["epoch"])
    assert result.metrics["val_loss"] == best["val_loss"]
    assert len(result.history) - result.best_epoch == 2  # stopped after `patience` epochs without improvement
    flags = [c["best"] for c in reporter.checkpoints]
    assert flags[0] is True and flags[result.best_epoch - 1] is True and not any(flags[result.best_epoch :])
    assert any("Early stopping after epoch" in e for e in reporter.events)


def test_the_result_is_the_best_epoch_not_the_last(iris: DatasetSource) -> None:
    result = run("mlp", "full", iris, epochs=12, learning_rate=0.3, seed=4, model_selection="best")
    accuracies = [row["val_accuracy"] for row in result.history]
    assert result.metrics["val_accuracy"] == max(accuracies)
    assert result.evaluation is not None and result.evaluation["accuracy"] == pytest.approx(max(accuracies))


def test_feature_cache_is_reused_across_jobs(reviews: DatasetSource, tmp_path: Path) -> None:
    first, second = ListReporter(), ListReporter()
    a = run("minilm-l6", "linear_probe", reviews, first, epochs=3, feature_cache_dir=tmp_path)
    b = run("minilm-l6", "linear_probe", reviews, second, epochs=3, feature_cache_dir=tmp_path)
    assert any(e.startswith("Computed backbone features for 40 examples") for e in first.events)
    assert any(e.startswith("Reused cached backbone features for 40 examples") for e in second.events)
    assert len(list((tmp_path / "features").iterdir())) == 1
    assert strip(a.history) == strip(b.history)
    other = reviews.model_copy(update={"sha256": "another-content"})
    third = ListReporter()
    run("minilm-l6", "linear_probe", other, third, epochs=1, feature_cache_dir=tmp_path)
    assert any(e.startswith("Computed") for e in third.events)


def test_starting_from_a_checkpoint_uses_its_tensors(iris: DatasetSource, tmp_path: Path) -> None:
    upstream = run("mlp", "full", iris, epochs=20)
    weights = tmp_path / "upstream.safetensors"
    save_weights(weights, upstream.state, upstream.spec)
    base = BaseModelSource(id="mdl_up", spec=upstream.spec, weights_path=weights)
    # A head-only checkpoint on top of the registered model (what a linear_probe job saves).
    probe = run(base, "linear_probe", iris, epochs=2, head="new")
    head = {k: v for k, v in probe.state.items() if k.startswith("head.")}
    checkpoint = tmp_path / "probe.safetensors"
    save_weights(checkpoint, head, probe.spec, extra={"method": "linear_probe"})
    from_checkpoint = base.model_copy(update={"checkpoints": [CheckpointRef(path=checkpoint, sha256="x")]})
    model, spec = load_upstream(from_checkpoint)
    assert spec.classes == probe.spec.classes
    assert torch.equal(model.head.weight, head["head.weight"])
    assert torch.equal(model.backbone.layers[0].weight, upstream.state["backbone.layers.0.weight"])


@pytest.fixture(scope="module")
def trained_cnn(tmp_path_factory: pytest.TempPathFactory) -> tuple[BaseModelSource, DatasetSource]:
    """cnn-small trained briefly, registered as an upstream model, and a small image dataset."""
    folder = tmp_path_factory.mktemp("cnn")
    images = source(write(folder / "digits.zip", digits_zip(16)), "image_classification")
    trained = run("cnn-small", "full", images, epochs=1, validation_split=0.25)
    weights = folder / "cnn.safetensors"
    save_weights(weights, trained.state, trained.spec)
    return BaseModelSource(id="mdl_cnn", spec=trained.spec, weights_path=weights), images


@pytest.mark.parametrize(
    ("architecture", "method"),
    [
        (architecture, method)
        for architecture in ("minilm-l6", "efficientnet-lite0", "cnn-small", "mlp")
        for method in BUILTIN_MODELS[architecture].architecture_methods
    ],
)
def test_every_method_runs_on_every_architecture_that_offers_it(
    architecture: str,
    method: str,
    reviews: DatasetSource,
    iris: DatasetSource,
    trained_cnn: tuple[BaseModelSource, DatasetSource],
    tmp_path: Path,
) -> None:
    """One epoch of each (architecture, method) the catalog offers, from learned weights."""
    if architecture == "minilm-l6":
        base, data = "minilm-l6", reviews
    elif architecture == "efficientnet-lite0":
        base, data = (
            "efficientnet-lite0",
            source(write(tmp_path / "d.zip", digits_zip(8)), "image_classification"),
        )
    elif architecture == "cnn-small":
        base, data = trained_cnn
    else:
        upstream = run("mlp", "full", iris, epochs=2)
        weights = tmp_path / "mlp.safetensors"
        save_weights(weights, upstream.state, upstream.spec)
        base, data = BaseModelSource(id="mdl_mlp", spec=upstream.spec, weights_path=weights), iris
    reporter = ListReporter()
    result = run(base, method, data, reporter, epochs=1, batch_size=8)
    assert len(result.history) == 1 and result.metrics["train_loss"] > 0
    assert result.spec.classes == data.classes
    assert (result.adapter is not None) == (method == "lora")
    assert len(reporter.checkpoints) == 1


def test_a_lora_checkpoint_can_start_another_job(reviews: DatasetSource, tmp_path: Path) -> None:
    class KeepLast(ListReporter):
        def checkpoint(self, **saved: Any) -> None:
            super().checkpoint(**saved)
            self.last = saved

    reporter = KeepLast()
    result = run("minilm-l6", "lora", reviews, reporter, epochs=1, lora_rank=2)
    path = tmp_path / "lora.safetensors"
    save_weights(path, reporter.last["tensors"], reporter.last["spec"], extra=reporter.last["metadata"])
    base = BaseModelSource(
        id="minilm-l6",
        spec=ModelSpec.for_builtin("minilm-l6"),
        checkpoints=[CheckpointRef(path=path, sha256="x")],
    )
    model, spec = load_upstream(base)
    assert spec.classes == ["negative", "positive"]
    state = model.state_dict()
    assert not any("lora" in k for k in state)  # merged on load
    for name in ("backbone.encoder.encoder.layer.0.attention.self.query.weight", "head.weight"):
        assert torch.allclose(state[name], result.state[name], atol=1e-6), name
