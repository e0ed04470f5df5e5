"""The fine-tuning recipe on real pretrained weights and tiny data, with an in-memory reporter."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from graft.defaults import default_hyperparameters
from graft.formats import inspect_dataset
from graft.sources import BaseModelSource, DatasetSource
from graft.spec import ModelSpec
from graft.storage import sha256_file
from ml.data import stratified_split
from ml.networks import build_model, efficientnet_lite0_pretrained_state, minilm_package_dir
from ml.runtime import JobCancelled, QuietReporter
from ml.weights import save_weights
from tests.helpers import digits_zip, iris_csv, sentiment_rows, text_csv, write
from workers.recipes.finetune import FinetuneConfig, FinetuneRecipe, FinetuneResult


class ListReporter(QuietReporter):
    def __init__(self, stop_after_steps: int | None = None) -> None:
        self.events: list[str] = []
        self.metrics_seen: list[dict[str, float]] = []
        self.checkpoints: list[dict[str, Any]] = []
        self.progress_seen: list[int] = []
        self.stop_after_steps = stop_after_steps

    def event(
        self, message: str, *, level: str = "info", data: dict[str, Any] | None = None, type: str = "message"
    ) -> None:
        self.events.append(message)

    def progress(self, *, epoch: int, epochs: int, step: int, total_steps: int) -> None:
        self.progress_seen.append(step)

    def metrics(self, *, epoch: int, step: int, values: dict[str, float]) -> None:
        self.metrics_seen.append(values)

    def checkpoint(
        self,
        *,
        epoch: int,
        step: int,
        tensors: dict[str, Any],
        spec: ModelSpec,
        metrics: dict[str, float],
        metadata: dict[str, str],
        best: bool,
    ) -> None:
        self.checkpoints.append({"epoch": epoch, "keys": sorted(tensors), "best": best, "metadata": metadata})

    def should_stop(self) -> bool:
        return self.stop_after_steps is not None and len(self.progress_seen) > self.stop_after_steps


def source(path: Path, task: str, **kwargs: Any) -> DatasetSource:
    info = inspect_dataset(path, task=task, fmt=path.suffix.lstrip("."), **kwargs)
    return DatasetSource(
        id="ds_test",
        path=path,
        task=task,
        format=info.format,
        labeled=info.labeled,
        classes=info.classes,
        schema_info=info.schema_info,
        sha256=sha256_file(path),
    )


def run(
    base: str | BaseModelSource,
    method: str,
    train: DatasetSource,
    reporter: ListReporter | None = None,
    seed: int = 3,
    head: str | None = None,
    feature_cache_dir: Path | None = None,
    **hp: Any,
) -> FinetuneResult:
    """One run of the recipe; keyword arguments other than head and feature_cache_dir are hyperparameters."""
    if isinstance(base, str):
        base = BaseModelSource(
            id=base, spec=ModelSpec.for_builtin(base), pretrained=base in ("minilm-l6", "efficientnet-lite0")
        )
    hyperparameters = {**default_hyperparameters(base.spec.architecture, method), **hp}
    config = FinetuneConfig(
        job_id="job_test",
        method=method,  # type: ignore[arg-type]
        base=base,
        train=train,
        hyperparameters=hyperparameters,  # type: ignore[arg-type]
        seed=seed,
        head=head,  # type: ignore[arg-type]
        feature_cache_dir=feature_cache_dir,
    )
    return FinetuneRecipe(config, reporter or ListReporter()).run()


@pytest.fixture(scope="module")
def reviews(tmp_path_factory: pytest.TempPathFactory) -> DatasetSource:
    path = write(tmp_path_factory.mktemp("reviews") / "reviews.csv", text_csv(sentiment_rows(60)))
    return source(path, "text_classification")


@pytest.fixture(scope="module")
def iris(tmp_path_factory: pytest.TempPathFactory) -> DatasetSource:
    path = write(tmp_path_factory.mktemp("iris") / "iris.csv", iris_csv())
    return source(path, "tabular_classification", label_column="species")


def test_linear_probe_trains_only_the_head_on_package_weights(reviews: DatasetSource) -> None:
    reporter = ListReporter()
    result = run("minilm-l6", "linear_probe", reviews, reporter, epochs=20)
    package = load_file(str(minilm_package_dir() / "model.safetensors"))
    backbone = {
        k.removeprefix("backbone.encoder."): v for k, v in result.state.items() if k.startswith("backbone.")
    }
    assert backbone, "the result holds the whole model"
    for name, tensor in backbone.items():
        assert torch.equal(tensor, package[name]), f"{name} moved during linear_probe"
    assert result.metrics["val_accuracy"] >= 0.9
    assert result.transfer["kind"] == "task" and result.transfer["head"] == "new"
    assert [c["epoch"] for c in reporter.checkpoints] == list(range(1, 21))
    assert reporter.checkpoints[0]["keys"] == ["head.bias", "head.weight"]
    losses = [m["train_loss"] for m in reporter.metrics_seen]
    assert losses[-1] < losses[0]
    assert any("Computed backbone features for" in e for e in reporter.events)


def test_full_finetune_moves_the_backbone(reviews: DatasetSource) -> None:
    reporter = ListReporter()
    result = run("minilm-l6", "full", reviews, reporter, epochs=1, batch_size=16)
    package = load_file(str(minilm_package_dir() / "model.safetensors"))
    name = "encoder.layer.5.output.dense.weight"
    moved = result.state[f"backbone.encoder.{name}"]
    assert not torch.equal(moved, package[name])
    # ... but it started from the package's weights: one epoch moves it a little, nowhere near a random init.
    random_init = build_model(ModelSpec.for_builtin("minilm-l6"), pretrained=False).state_dict()[
        f"backbone.encoder.{name}"
    ]
    assert (moved - package[name]).norm() < 0.05 * (random_init - package[name]).norm()
    assert "backbone.encoder.embeddings.word_embeddings.weight" in reporter.checkpoints[0]["keys"]


def test_efficientnet_linear_probe_keeps_imagenet_weights_and_statistics(tmp_path: Path) -> None:
    images = source(write(tmp_path / "digits.zip", digits_zip(12)), "image_classification")
    result = run("efficientnet-lite0", "linear_probe", images, epochs=2, validation_split=0.0)
    package = efficientnet_lite0_pretrained_state()
    for name, tensor in package.items():
        assert torch.equal(result.state[f"backbone.net.{name}"], tensor), name  # BN running stats included


def strip(history: list[dict[str, float]]) -> list[dict[str, float]]:
    """Metrics without wall-clock timings."""
    return [{k: v for k, v in h.items() if k != "epoch_seconds"} for h in history]


def test_same_seed_same_metrics_on_cpu(iris: DatasetSource, reviews: DatasetSource) -> None:
    first = run("mlp", "full", iris, seed=11, epochs=5)
    second = run("mlp", "full", iris, seed=11, epochs=5)
    other = run("mlp", "full", iris, seed=12, epochs=5)
    assert strip(first.history) == strip(second.history)
    assert strip(first.history) != strip(other.history)
    probe_a = run("minilm-l6", "linear_probe", reviews, seed=5, epochs=3)
    probe_b = run("minilm-l6", "linear_probe", reviews, seed=5, epochs=3)
    assert strip(probe_a.history) == strip(probe_b.history)


def test_mlp_learns_iris_from_scratch(iris: DatasetSource) -> None:
    result = run("mlp", "full", iris, epochs=40)
    assert result.metrics["val_accuracy"] >= 0.85
    assert result.spec.input_spec["feature_columns"] == [
        "sepal_length",
        "sepal_width",
        "petal_length",
        "petal_width",
    ]
    assert not torch.equal(
        result.state["backbone.input_std"], torch.ones(4)
    )  # standardised with the data's statistics


def test_cancel_stops_within_a_few_steps(iris: DatasetSource) -> None:
    reporter = ListReporter(stop_after_steps=3)
    with pytest.raises(JobCancelled):
        run("mlp", "full", iris, reporter, epochs=50)
    assert len(reporter.progress_seen) <= 5


def test_fine_tuning_a_registered_model_keeps_or_replaces_the_head(
    iris: DatasetSource, tmp_path: Path
) -> None:
    upstream = run("mlp", "full", iris, epochs=30)
    weights = tmp_path / "upstream.safetensors"
    save_weights(weights, upstream.state, upstream.spec)
    base = BaseModelSource(id="mdl_upstream", spec=upstream.spec, weights_path=weights)

    same_labels = run(base, "linear_probe", iris, epochs=1, learning_rate=1e-9)
    assert same_labels.transfer == {
        "kind": "domain",
        "head": "keep",
        "source_classes": ["setosa", "versicolor", "virginica"],
        "matched_classes": 3,
    }
    assert same_labels.metrics["val_accuracy"] >= 0.85  # the kept head works before any learning
    for name in ("backbone.layers.0.weight", "backbone.input_mean"):
        assert torch.equal(same_labels.state[name], upstream.state[name])

    two_classes = tmp_path / "two.csv"
    two_classes.write_bytes(b"\n".join(line for line in iris_csv().split(b"\n") if b"virginica" not in line))
    relabelled = run(
        base, "linear_probe", source(two_classes, "tabular_classification", label_column="species"), epochs=3
    )
    assert relabelled.transfer["kind"] == "task"
    assert relabelled.spec.classes == ["setosa", "versicolor"]


def test_stratified_split_keeps_class_shares_and_is_seeded() -> None:
    labels = torch.tensor([0] * 80 + [1] * 20)
    train, held_out = stratified_split(labels, 0.1, seed=1)
    assert sorted(train + held_out) == list(range(100))
    assert sum(int(labels[i]) == 1 for i in held_out) == 2
    assert len(held_out) == 10
    assert stratified_split(labels, 0.1, seed=1) == (train, held_out)
    assert stratified_split(labels, 0.1, seed=2) != (train, held_out)
    assert stratified_split(labels, 0.0, seed=1) == (list(range(100)), [])
