"""The rules that make transfer work on small data: image networks sized by their data, learning rates
that respect learned weights, batch-norm statistics re-estimated under a shift (AdaBN), a kept head
checked before the backbone moves, augmentation in training only, and no model selection on a handful of
validation examples."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image, ImageOps

from graft.defaults import resolve_hyperparameters
from graft.sources import BaseModelSource, DatasetSource
from graft.spec import ModelSpec
from ml.augment import ImageAugmenter
from ml.data import image_geometry, load_inputs
from ml.networks import CnnSmallBackbone, build_model, count_parameters
from ml.norms import BN_SHIFT_THRESHOLD
from ml.weights import load_model, save_weights
from tests.helpers import digit_images, digits_table_csv, image_zip, write
from tests.unit.test_finetune_recipe import ListReporter, run, source
from workers.recipes.finetune import FinetuneConfig, FinetuneRecipe


class DataReporter(ListReporter):
    """Keeps each event's data beside its message."""

    def __init__(self) -> None:
        super().__init__()
        self.data: list[dict[str, Any]] = []

    def event(self, message: str, *, data: dict[str, Any] | None = None, **_: Any) -> None:
        self.events.append(message)
        self.data.append(data or {})

    def find(self, key: str) -> dict[str, Any]:
        return next(d for d in self.data if key in d)


def digits(
    n: int, side: int, *, seed: int = 0, invert: bool = False, offset: int = 0
) -> list[tuple[str, Any]]:
    out = []
    for label, image in digit_images(n, classes=range(4), seed=seed, offset=offset):
        image = image.resize((side, side))
        out.append((str(label), ImageOps.invert(image) if invert else image))
    return out


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("small")


@pytest.fixture(scope="module")
def upstream(folder: Path) -> BaseModelSource:
    """resnet-small pretrained on 240 digits 0-3 at 16 px, registered like a pretrain job's result."""
    data = source(write(folder / "up.zip", image_zip(digits(240, 16))), "image_classification")
    result = run("resnet-small", "full", data, epochs=6, validation_split=0.0)
    weights = folder / "up.safetensors"
    save_weights(weights, result.state, result.spec)
    return BaseModelSource(id="upstream", spec=result.spec, weights_path=weights, weights_sha256="x")


def test_resnet_small_input_follows_the_data(folder: Path) -> None:
    grey16 = source(write(folder / "g16.zip", image_zip(digits(8, 16))), "image_classification")
    colour = [(label, Image.merge("RGB", [image.resize((40, 52))] * 3)) for label, image in digits(8, 16)]
    colour40 = source(write(folder / "c40.zip", image_zip(colour)), "image_classification")
    large = [(label, image.convert("RGB").resize((300, 200))) for label, image in digits(8, 16)]
    large_ds = source(write(folder / "big.zip", image_zip(large)), "image_classification")

    g = image_geometry(grey16)
    assert (g.side, g.channels, g.stem_stride) == (16, 1, 1)  # read at 16 px, not upsampled to 64
    c = image_geometry(colour40)
    assert (c.side, c.channels, c.stem_stride) == (40, 3, 1)  # the shorter side
    b = image_geometry(large_ds)
    assert (b.side, b.channels, b.stem_stride) == (128, 3, 4)  # capped; the stem brings it to 32

    result = run("resnet-small", "full", grey16, epochs=1, validation_split=0.0)
    assert (result.spec.input_spec["height"], result.spec.input_spec["channels"]) == (16, 1)
    inputs, _ = load_inputs(grey16, result.spec)
    assert tuple(inputs.batch([0, 1]).shape) == (2, 1, 16, 16)
    # The spec travels in the weights file: the model loads and predicts as it was trained.
    path = folder / "sized.safetensors"
    save_weights(path, result.state, result.spec)
    loaded = load_model(path, result.spec)
    fresh = build_model(result.spec, pretrained=False)
    fresh.load_state_dict(result.state)
    batch = inputs.batch(list(range(len(inputs))))
    loaded.eval()
    fresh.eval()
    assert torch.equal(loaded(batch), fresh(batch))


def test_cnn_small_keeps_its_meaning() -> None:
    """Models stored with cnn-small keep loading and predicting as before: the same tensors, shapes and
    input size (the new image architecture is another id)."""
    spec = ModelSpec.for_builtin("cnn-small").with_classes(["a", "b"])
    model = build_model(spec, pretrained=False)
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    assert isinstance(model.backbone, CnnSmallBackbone)
    assert (spec.input_spec["height"], spec.input_spec["width"], spec.input_spec["channels"]) == (64, 64, 3)
    assert shapes["backbone.conv_blocks.0.0.weight"] == (32, 3, 3, 3)
    assert shapes["backbone.conv_blocks.2.0.weight"] == (128, 64, 3, 3)
    assert shapes["head.weight"] == (2, 128)
    assert count_parameters(model.backbone) == 93_472
    assert len(shapes) == 20  # 3 x (conv, BN weight, bias, mean, var, count) + head


def test_learned_weights_get_their_measured_rate() -> None:
    """cnn-small and mlp fine-tune a pretrain job's weights at a quarter of the from-scratch rate;
    resnet-small at its from-scratch rate (measured best by bench.quality); a rate the client gives wins."""
    for architecture, factor in (("cnn-small", 0.25), ("mlp", 0.25), ("resnet-small", 1.0)):
        scratch = resolve_hyperparameters(architecture, "full", {}, fine_tunes_learned_weights=False)
        learned = resolve_hyperparameters(architecture, "full", {}, fine_tunes_learned_weights=True)
        assert learned["learning_rate"] == pytest.approx(scratch["learning_rate"] * factor)
        given = resolve_hyperparameters(
            architecture, "full", {"learning_rate": 0.5}, fine_tunes_learned_weights=True
        )
        assert given["learning_rate"] == 0.5
    # The pretrained built-ins' table rates are already for their learned weights.
    minilm = resolve_hyperparameters("minilm-l6", "full", {}, fine_tunes_learned_weights=True)
    assert minilm["learning_rate"] == 5e-5


def test_fine_tune_on_a_shifted_domain_converges_with_a_checked_head(
    folder: Path, upstream: BaseModelSource
) -> None:
    """The upstream's own classes on inverted digits (another pixel distribution): the kept head is
    checked and refitted before the backbone moves, the statistics are re-estimated, and training
    converges instead of diverging."""
    shifted = source(
        write(folder / "inv.zip", image_zip(digits(48, 16, seed=5, invert=True))), "image_classification"
    )
    reporter = DataReporter()
    hp = resolve_hyperparameters(
        "resnet-small", "full", {}, train_examples=48, fine_tunes_learned_weights=True
    )
    config = FinetuneConfig(
        job_id="j",
        method="full",
        base=upstream,
        train=shifted,
        seed=0,
        hyperparameters={**hp, "validation_split": 0.0},
    )
    result = FinetuneRecipe(config, reporter).run()
    assert result.transfer is not None and result.transfer["head"] == "keep"
    head = reporter.find("kept_head_accuracy")
    assert head["fitted_head_accuracy"] > head["kept_head_accuracy"]
    norms = reporter.find("batch_norm_statistics")
    assert norms["batch_norm_shift"] > BN_SHIFT_THRESHOLD and norms["batch_norm_statistics"] == "target"
    losses = [h["train_loss"] for h in result.history]
    assert max(losses) < 2.0 * losses[0] and max(losses) < 3.0  # no blow-up (a diverging run went 7.5, 31.7)
    assert result.history[-1]["train_accuracy"] >= 0.9


def test_adabn_statistics_are_the_training_data(folder: Path, upstream: BaseModelSource) -> None:
    shifted = source(
        write(folder / "inv2.zip", image_zip(digits(24, 16, seed=7, invert=True))), "image_classification"
    )
    config = FinetuneConfig(
        job_id="j",
        method="full",
        base=upstream,
        train=shifted,
        seed=0,
        hyperparameters=resolve_hyperparameters(
            "resnet-small",
            "full",
            {
                "batch_norm_statistics": "target",
                "epochs": 1,
                "validation_split": 0.0,
                "head_warmup_epochs": 0,
            },
            fine_tunes_learned_weights=True,
        ),
    )
    recipe = FinetuneRecipe(config, DataReporter())
    recipe.setup()
    stem_conv, stem_norm = recipe.model.backbone.stem[0], recipe.model.backbone.stem[1]
    with torch.no_grad():
        activations = stem_conv(recipe.train_inputs.batch(list(range(len(recipe.train_inputs)))))
    assert torch.allclose(stem_norm.running_mean, activations.mean(dim=(0, 2, 3)), atol=1e-4)

    kept = config.model_copy(
        update={
            "hyperparameters": config.hyperparameters.model_copy(update={"batch_norm_statistics": "source"})
        }
    )
    recipe = FinetuneRecipe(kept, DataReporter())
    recipe.setup()
    stored = load_model(upstream.weights_path, upstream.spec).backbone.stem[1].running_mean  # type: ignore[arg-type]
    assert torch.equal(recipe.model.backbone.stem[1].running_mean, stored)


def test_augmentation_in_training_only(folder: Path) -> None:
    data = source(write(folder / "aug.zip", image_zip(digits(40, 16))), "image_classification")
    # 100 epochs of one batch: 100 steps, enough for augmentation by default.
    hp = resolve_hyperparameters(
        "resnet-small", "full", {"epochs": 100, "batch_size": 32, "validation_split": 0.25}
    )
    config = FinetuneConfig(
        job_id="j", method="full", base=builtin("resnet-small"), train=data, seed=0, hyperparameters=hp
    )
    recipe = FinetuneRecipe(config, DataReporter())
    recipe.setup()
    assert recipe.augmenter is not None  # light, by default, for a small image set and a run of 100 steps
    calls: list[int] = []
    original = recipe.augmenter.forward

    def counted(images: torch.Tensor) -> torch.Tensor:
        calls.append(len(images))
        out = original(images)
        assert out.shape == images.shape and not torch.equal(out, images)
        return out

    recipe.augmenter.forward = counted  # type: ignore[method-assign]
    recipe.train()
    assert sum(calls) == 100 * len(recipe.train_inputs)  # every training image, each epoch; nothing else
    first = recipe.evaluate()
    assert recipe.evaluate() == first and sum(calls) == 100 * len(recipe.train_inputs)
    short = config.model_copy(
        update={"hyperparameters": config.hyperparameters.model_copy(update={"epochs": 2})}
    )
    recipe = FinetuneRecipe(short, DataReporter())
    recipe.setup()
    assert recipe.augmenter is None  # 2 steps: no time to learn through the variation

    none = config.model_copy(
        update={"hyperparameters": config.hyperparameters.model_copy(update={"augmentation": "none"})}
    )
    recipe = FinetuneRecipe(none, DataReporter())
    recipe.setup()
    assert recipe.augmenter is None


def test_light_policy_is_label_safe() -> None:
    """No flips: an asymmetric image never comes back mirrored."""
    spec = {"height": 16, "width": 16, "channels": 1, "mean": [0.5], "std": [0.5]}
    augmenter = ImageAugmenter("light", spec)
    image = torch.full((1, 1, 16, 16), -1.0)
    image[:, :, 4:12, 2:5] = 1.0  # a bar on the left
    out = augmenter(image.repeat(64, 1, 1, 1))
    left, right = out[:, :, :, :8].mean(dim=(1, 2, 3)), out[:, :, :, 8:].mean(dim=(1, 2, 3))
    assert bool((left > right).all())


def builtin(architecture: str) -> BaseModelSource:
    return BaseModelSource(id=architecture, spec=ModelSpec.for_builtin(architecture), pretrained=False)


def test_few_validation_examples_do_not_choose_the_epoch(folder: Path) -> None:
    table = source(
        write(folder / "digits.csv", digits_table_csv(range(4), 60)),
        "tabular_classification",
        label_column="digit",
    )
    reporter = DataReporter()
    result = run(
        "mlp", "full", table, reporter, epochs=8, validation_split=0.2
    )  # 12 validation rows, 4 classes
    assert result.best_epoch == len(result.history) == 8
    assert reporter.find("model_selection")["model_selection"] == "last"
    assert all(c["best"] for c in reporter.checkpoints)

    # Asked for, the best epoch is still chosen on them; with enough of them it is the default.
    chosen = run(
        "mlp", "full", table, epochs=8, validation_split=0.2, model_selection="best", learning_rate=0.05
    )
    best = max(range(8), key=lambda i: (chosen.history[i]["val_accuracy"], -chosen.history[i]["val_loss"]))
    assert chosen.best_epoch == best + 1
    many = source(
        write(folder / "many.csv", digits_table_csv(range(2), 300)),
        "tabular_classification",
        label_column="digit",
    )
    hp = resolve_hyperparameters("mlp", "full", {"epochs": 1, "validation_split": 0.2})
    recipe = FinetuneRecipe(
        FinetuneConfig(
            job_id="j", method="full", base=builtin("mlp"), train=many, seed=0, hyperparameters=hp
        ),
        DataReporter(),
    )
    recipe.setup()  # 60 validation rows for 2 classes
    assert recipe.selection == "best"


def test_mlp_standardisation_follows_a_shifted_table(folder: Path) -> None:
    """The mlp's normalisation is its input standardisation: on a table whose columns moved (dimmed,
    offset), a full fine-tune re-estimates it on the training rows; on the same distribution it is kept."""
    import csv
    import io

    def table(path: Path, scale: float, offset: float, count: int, start: int) -> DatasetSource:
        rows = list(csv.reader(io.StringIO(digits_table_csv(range(4), count, offset=start).decode())))
        out = io.StringIO()
        writer = csv.writer(out)
        writer.writerow(rows[0])
        for row in rows[1:]:
            writer.writerow([f"{float(v) * scale + offset:.3f}" for v in row[:-1]] + [row[-1]])
        return source(write(path, out.getvalue().encode()), "tabular_classification", label_column="digit")

    upstream_data = table(folder / "t-up.csv", 1.0, 0.0, 200, 0)
    result = run("mlp", "full", upstream_data, epochs=10, validation_split=0.0)
    weights = folder / "t-up.safetensors"
    save_weights(weights, result.state, result.spec)
    base = BaseModelSource(id="mlp up", spec=result.spec, weights_path=weights, weights_sha256="t")

    shifted = table(folder / "t-shift.csv", 0.5, 3.0, 40, 200)
    reporter = DataReporter()
    hp = resolve_hyperparameters(
        "mlp", "full", {"epochs": 2, "validation_split": 0.0}, fine_tunes_learned_weights=True
    )
    recipe = FinetuneRecipe(
        FinetuneConfig(job_id="j", method="full", base=base, train=shifted, seed=0, hyperparameters=hp),
        reporter,
    )
    recipe.setup()
    assert reporter.find("batch_norm_statistics")["batch_norm_statistics"] == "target"
    rows = recipe.train_inputs.batch(list(range(len(recipe.train_inputs))))
    assert torch.allclose(recipe.model.backbone.input_mean, rows.mean(dim=0), atol=1e-5)

    same = table(folder / "t-same.csv", 1.0, 0.0, 200, 200)
    reporter = DataReporter()
    FinetuneRecipe(
        FinetuneConfig(job_id="j", method="full", base=base, train=same, seed=0, hyperparameters=hp), reporter
    ).setup()
    assert reporter.find("batch_norm_statistics")["batch_norm_statistics"] == "source"
