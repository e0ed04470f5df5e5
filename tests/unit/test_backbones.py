"""Built-in backbones: weights from the packages, sizes as the catalog states, and one preprocessing
path shared by training and serving."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from graft.catalog import BUILTIN_MODELS
from graft.spec import ModelSpec
from ml.networks import (
    build_model,
    count_parameters,
    efficientnet_lite0_weights_file,
    minilm_package_dir,
)
from ml.preprocess import (
    InputError,
    TextPipeline,
    images_to_tensor,
    prepare_image,
    rows_to_array,
)


@pytest.mark.parametrize("architecture", ["minilm-l6", "efficientnet-lite0", "cnn-small"])
def test_catalog_parameter_counts_are_the_networks(architecture: str) -> None:
    model = build_model(ModelSpec.for_builtin(architecture), pretrained=False)
    assert count_parameters(model.backbone) == BUILTIN_MODELS[architecture].num_parameters
    assert model.feature_dim == BUILTIN_MODELS[architecture].feature_dim
    assert model.head is None


def test_minilm_starts_from_the_package_weights() -> None:
    package = load_file(str(minilm_package_dir() / "model.safetensors"))
    model = build_model(ModelSpec.for_builtin("minilm-l6").with_classes(["a", "b"]), pretrained=True)
    encoder = model.backbone.encoder.state_dict()
    compared = 0
    for name, tensor in encoder.items():
        if name in package:
            assert torch.equal(tensor, package[name]), name
            compared += 1
    assert compared == len(encoder) >= 100
    random_init = build_model(
        ModelSpec.for_builtin("minilm-l6"), pretrained=False
    ).backbone.encoder.state_dict()
    assert not torch.equal(
        random_init["encoder.layer.0.attention.self.query.weight"],
        package["encoder.layer.0.attention.self.query.weight"],
    )


def test_efficientnet_starts_from_the_package_imagenet_weights() -> None:
    package = torch.load(efficientnet_lite0_weights_file(), map_location="cpu", weights_only=True)
    model = build_model(ModelSpec.for_builtin("efficientnet-lite0"), pretrained=True)
    state = model.backbone.net.state_dict()
    for name, tensor in state.items():
        assert torch.equal(tensor, package[name]), name
    assert "_fc.weight" in package and "_fc.weight" not in state  # ImageNet classifier replaced by our head


def test_efficientnet_recognises_a_real_photo() -> None:
    """The ImageNet weights and our preprocessing agree: scikit-learn's flower photo is a daisy (985)."""
    from efficientnet_lite_pytorch import EfficientNet
    from sklearn.datasets import load_sample_images

    net = EfficientNet.from_name("efficientnet-lite0")
    net.load_state_dict(torch.load(efficientnet_lite0_weights_file(), map_location="cpu", weights_only=True))
    net.eval()
    flower = Image.fromarray(load_sample_images().images[1])
    spec = ModelSpec.for_builtin("efficientnet-lite0")
    batch = images_to_tensor([prepare_image(flower, spec.input_spec)], spec.input_spec)
    with torch.no_grad():
        assert int(net(batch).argmax()) == 985


def _encode(image: Image.Image, fmt: str = "PNG", **kwargs: object) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt, **kwargs)
    return out.getvalue()


@pytest.mark.parametrize(
    "image",
    [
        Image.new("RGB", (640, 480), (10, 20, 30)),
        Image.new("L", (20, 90), 128),
        Image.new("RGBA", (50, 50), (255, 0, 0, 255)),
        Image.new("P", (33, 77)),
        Image.new("CMYK", (40, 40)),
        Image.new("I;16", (64, 64)),
        Image.new("1", (31, 31)),
    ],
    ids=lambda image: image.mode,
)
def test_any_size_and_mode_becomes_the_input_spec(image: Image.Image) -> None:
    for architecture in ("efficientnet-lite0", "cnn-small"):
        spec = ModelSpec.for_builtin(architecture).input_spec
        array = prepare_image(_encode(image, "TIFF" if image.mode == "CMYK" else "PNG"), spec)
        assert array.dtype == np.uint8
        assert array.shape == (3, spec["height"], spec["width"])


def test_transparency_becomes_white_and_16_bit_keeps_its_range() -> None:
    spec = ModelSpec.for_builtin("cnn-small").input_spec
    clear = prepare_image(_encode(Image.new("RGBA", (10, 10), (0, 0, 0, 0))), spec)
    assert (clear == 255).all()
    ramp = Image.fromarray(np.linspace(0, 60000, 64 * 64).reshape(64, 64).astype(np.uint16))
    array = prepare_image(_encode(ramp), spec)
    assert array.min() == 0 and array.max() >= 250  # scaled, not clipped to white


def test_exif_orientation_is_applied() -> None:
    tall = Image.new("RGB", (40, 80), (200, 0, 0))
    tall.paste((0, 0, 200), (0, 0, 40, 40))  # blue on top
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when shown
    data = _encode(tall, "JPEG", exif=exif.tobytes())
    spec = {"channels": 3, "height": 40, "width": 80}
    array = prepare_image(data, spec)
    # Shown rotated, the blue half is on the right.
    assert array[2, 20, 60] > 150 and array[0, 20, 10] > 150


def test_text_pipeline_truncates_and_pads() -> None:
    spec = ModelSpec.for_builtin("minilm-l6").model_copy(
        update={"input_spec": {"type": "text", "max_length": 8}}
    )
    batch = TextPipeline(spec)(["short", "a much longer sentence that will certainly be cut off here"])
    assert batch["input_ids"].shape == (2, 8)
    assert batch["attention_mask"][0].sum() < 8 and batch["attention_mask"][1].sum() == 8


def test_rows_to_array_orders_columns_and_names_problems() -> None:
    array = rows_to_array([{"b": 2, "a": 1.5}], ["a", "b"])
    assert array.tolist() == [[1.5, 2.0]]
    with pytest.raises(InputError, match=r"inputs\[1\] is missing the column 'b'"):
        rows_to_array([{"a": 1, "b": 2}, {"a": 1}], ["a", "b"])
    with pytest.raises(InputError, match=r"column 'a': 'x' is not a number"):
        rows_to_array([{"a": "x", "b": 2}], ["a", "b"])
    with pytest.raises(InputError, match="finite"):
        rows_to_array([{"a": float("nan"), "b": 2}], ["a", "b"])
