"""Model import: one validation for a config part and for the graft_spec a weights file carries, tensor
shapes checked from the safetensors header against a meta-device build, and every refusal a 422 that
names the field and leaves nothing behind. Every file here is a real safetensors file."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file
from sqlalchemy import func, select

from app.cli import prestart
from app.core.errors import Unprocessable
from app.core.security import Principal
from app.datasets.upload import ReceivedUpload
from app.models import importing
from app.models.schemas import ImportConfig
from app.projects.service import create_project
from graft.config import Settings
from graft.db import make_engine, make_session_factory, session_scope
from graft.spec import SPEC_METADATA_KEY, ModelSpec
from graft.storage import Storage, sha256_file
from graft.tables import Model
from ml.networks import build_model, count_parameters
from ml.weights import save_weights

COLUMNS = ["sepal_length", "sepal_width", "petal_length", "petal_width"]


def graft_spec(base: str, /, **changes: Any) -> dict[str, Any]:
    """A spec as Graft writes it into the files it exports (ModelSpec.model_dump), changed as asked:
    `options__in_features=3` sets data["options"]["in_features"]."""
    spec = ModelSpec.for_builtin(base).with_classes(["cat", "dog"])
    if base == "mlp":
        spec = spec.model_copy(
            update={
                "options": {"in_features": len(COLUMNS), "hidden": [16]},
                "input_spec": {**spec.input_spec, "feature_columns": list(COLUMNS)},
            }
        )
    data = spec.model_dump()
    for path, value in changes.items():
        *parents, last = path.split("__")
        target = data
        for parent in parents:
            target = target[parent]
        target[last] = value
    return data


@pytest.fixture
def storage(tmp_path: Path) -> Storage:
    return Storage(tmp_path / "storage")


def stored_files(storage: Storage) -> list[Path]:
    return [path for path in storage.root.rglob("*") if path.is_file()]


def upload_of(
    path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None, **fields: str
) -> ReceivedUpload:
    save_file(tensors, str(path), metadata=metadata)
    return ReceivedUpload(fields=fields, path=path, size=path.stat().st_size, sha256=sha256_file(path))


def embedded(
    tmp_path: Path, spec_text: str, tensors: dict[str, torch.Tensor] | None = None
) -> ReceivedUpload:
    return upload_of(
        tmp_path / "weights.safetensors", tensors or {"x": torch.zeros(2)}, {SPEC_METADATA_KEY: spec_text}
    )


def with_config(
    tmp_path: Path, config: object, tensors: dict[str, torch.Tensor] | None = None
) -> ReceivedUpload:
    text = config if isinstance(config, str) else json.dumps(config)
    return upload_of(tmp_path / "weights.safetensors", tensors or {"x": torch.zeros(2)}, None, config=text)


def refused(storage: Storage, upload: ReceivedUpload, **limits: int) -> Unprocessable:
    with pytest.raises(Unprocessable) as caught:
        importing.prepare_import(storage, upload, **limits)
    assert caught.value.status_code == 422
    assert upload.path is not None and not upload.path.exists()  # the upload is discarded
    assert stored_files(storage) == []  # and nothing was written
    return caught.value


# ------------------------------------------------------------------------------------ the embedded spec


EMBEDDED_REFUSALS: list[tuple[str, dict[str, Any] | str, str, str]] = [
    (
        "unknown architecture",
        graft_spec("cnn-small", architecture="resnet-9000"),
        "architecture",
        "unknown architecture 'resnet-9000'",
    ),
    (
        "architecture not a string",
        graft_spec("cnn-small", architecture=["cnn-small"]),
        "architecture",
        "unknown architecture",
    ),
    ("invalid JSON", '{"architecture": "cnn-small", ', "", "not valid JSON"),
    ("nested past the parser", "[" * 100_000 + "]" * 100_000, "", "not valid JSON"),
    ("a list", "[1, 2]", "", "must be a JSON object, not a list"),
    ("a string", '"cnn-small"', "", "must be a JSON object, not a string"),
    ("null", "null", "", "must be a JSON object, not null"),
    ("unknown field", {**graft_spec("cnn-small"), "weights_url": "http://x"}, "weights_url", "unknown field"),
    (
        "modality of another architecture",
        graft_spec("cnn-small", modality="text"),
        "modality",
        "cnn-small takes image inputs",
    ),
    (
        "no modality",
        {k: v for k, v in graft_spec("cnn-small").items() if k != "modality"},
        "modality",
        "missing",
    ),
    (
        "missing in_features",
        graft_spec("mlp", options={"hidden": [16]}),
        "options.in_features",
        "an mlp needs in_features",
    ),
    (
        "negative in_features",
        graft_spec("mlp", options__in_features=-4),
        "options.in_features",
        "integer from 1 to 10000 (-4 given)",
    ),
    (
        "oversized in_features",
        graft_spec("mlp", options__in_features=10_001),
        "options.in_features",
        "integer from 1 to 10000",
    ),
    (
        "float in_features",
        graft_spec("mlp", options__in_features=4.0),
        "options.in_features",
        "integer from 1 to 10000",
    ),
    (
        "in_features not the columns",
        graft_spec("mlp", options__in_features=3),
        "options.in_features",
        "names 4 columns",
    ),
    (
        "string hidden",
        graft_spec("mlp", options__hidden="128"),
        "options.hidden",
        "list of 1 to 8 layer sizes",
    ),
    (
        "string hidden sizes",
        graft_spec("mlp", options__hidden=["128"]),
        "options.hidden",
        "integers from 1 to 4096",
    ),
    (
        "boolean hidden size",
        graft_spec("mlp", options__hidden=[True]),
        "options.hidden",
        "integers from 1 to 4096",
    ),
    (
        "huge hidden layers",
        graft_spec("mlp", options__hidden=[12000, 12000]),
        "options.hidden",
        "integers from 1 to 4096",
    ),
    (
        "nine hidden layers",
        graft_spec("mlp", options__hidden=[8] * 9),
        "options.hidden",
        "1 to 8 layer sizes",
    ),
    ("no hidden layers", graft_spec("mlp", options__hidden=[]), "options.hidden", "1 to 8 layer sizes"),
    (
        "minilm 99 layers",
        graft_spec("minilm-l6", options={"layers": 99}),
        "options.layers",
        "integer from 1 to 6 (99 given)",
    ),
    (
        "deeply nested option",
        '{"architecture": "minilm-l6", "modality": "text", "options": {"layers": '
        + "[" * 900
        + "]" * 900
        + "}}",
        "options.layers",
        "(a list of 1 item given)",
    ),
    (
        "minilm 0 layers",
        graft_spec("minilm-l6", options={"layers": 0}),
        "options.layers",
        "integer from 1 to 6",
    ),
    (
        "minilm layers as text",
        graft_spec("minilm-l6", options={"layers": "2"}),
        "options.layers",
        "integer from 1 to 6",
    ),
    ("cnn width 1", graft_spec("cnn-small", options={"width": 1}), "options.width", "integer from 4 to 256"),
    (
        "adapter of no width",
        graft_spec("minilm-l6", options={"adapter": 0}),
        "options.adapter",
        "integer from 1 to 4096",
    ),
    (
        "cnn width 100000",
        graft_spec("cnn-small", options={"width": 100_000}),
        "options.width",
        "integer from 4 to 256",
    ),
    (
        "option of another architecture",
        graft_spec("efficientnet-lite0", options={"width": 32}),
        "options.width",
        "does not apply to efficientnet-lite0 (it has none)",
    ),
    (
        "unknown option",
        graft_spec("minilm-l6", options={"dropout": 0.5}),
        "options.dropout",
        "does not apply to minilm-l6 (its options: layers)",
    ),
    ("options not an object", graft_spec("cnn-small", options=[32]), "options", "must be an object"),
    (
        "image size not its own",
        graft_spec("cnn-small", input_spec__height=512),
        "input_spec.height",
        "must be 64",
    ),
    (
        "image mean not its own",
        graft_spec("efficientnet-lite0", input_spec__mean=[0.5, 0.5, 0.5]),
        "input_spec.mean",
        "efficientnet-lite0's own preprocessing",
    ),
    (
        "one channel for three",
        graft_spec("cnn-small", input_spec__channels=1),
        "input_spec.channels",
        "must be 3",
    ),
    (
        "input type of another modality",
        graft_spec("minilm-l6", input_spec__type="image"),
        "input_spec.type",
        "must be 'text'",
    ),
    (
        "unknown input_spec field",
        graft_spec("cnn-small", input_spec__interpolation="nearest"),
        "input_spec.interpolation",
        "does not apply to cnn-small",
    ),
    (
        "feature columns for an image model",
        graft_spec("cnn-small", input_spec__feature_columns=["a"]),
        "input_spec.feature_columns",
        "does not apply to cnn-small",
    ),
    (
        "max_length too short",
        graft_spec("minilm-l6", input_spec__max_length=4),
        "input_spec.max_length",
        "integer from 8 to 512",
    ),
    (
        "max_length too long",
        graft_spec("minilm-l6", input_spec__max_length=100_000),
        "input_spec.max_length",
        "integer from 8 to 512",
    ),
    (
        "input_spec not an object",
        graft_spec("cnn-small", input_spec="64x64"),
        "input_spec",
        "must be an object",
    ),
    (
        "mlp without its columns",
        graft_spec("mlp", input_spec={"type": "tabular"}),
        "input_spec.feature_columns",
        "an mlp needs its feature_columns",
    ),
    (
        "duplicate feature columns",
        graft_spec("mlp", input_spec__feature_columns=["a", "b", "a", "c"]),
        "input_spec.feature_columns[2]",
        "'a' is there twice",
    ),
    (
        "long feature column",
        graft_spec("mlp", input_spec__feature_columns=["a", "b", "c", "d" * 201]),
        "input_spec.feature_columns[3]",
        "longer than 200 characters",
    ),
    (
        "too many feature columns",
        graft_spec("mlp", input_spec__feature_columns=[f"f{i}" for i in range(10_001)]),
        "input_spec.feature_columns",
        "at most 10000 feature columns",
    ),
    (
        "lone surrogate in a class",
        '{"architecture": "cnn-small", "modality": "image", "classes": ["cat", "\\ud800"]}',
        "classes[1]",
        "lone surrogate",
    ),
    ("NUL in a class", graft_spec("cnn-small", classes=["cat", "d\x00g"]), "classes[1]", "a NUL character"),
    (
        "lone surrogate in a field name",
        '{"architecture": "cnn-small", "modality": "image", "options": {"\\udfff": 1}}',
        "options",
        "lone surrogate",
    ),
    (
        "duplicate classes",
        graft_spec("cnn-small", classes=["x", "y", "x"]),
        "classes[2]",
        "'x' is there twice: classes must be distinct",
    ),
    ("one class", graft_spec("cnn-small", classes=["x"]), "classes", "at least two classes"),
    ("empty class", graft_spec("cnn-small", classes=["x", " "]), "classes[1]", "is empty"),
    (
        "class not a string",
        graft_spec("cnn-small", classes=["x", 7]),
        "classes[1]",
        "must be a string, not a number",
    ),
    ("classes not a list", graft_spec("cnn-small", classes="x,y"), "classes", "must be a list of strings"),
    (
        "too many classes",
        graft_spec("cnn-small", classes=[f"c{i}" for i in range(1001)]),
        "classes",
        "at most 1000 classes (1001 given)",
    ),
    (
        "long classes",
        graft_spec("cnn-small", classes=["x", "y" * 1000]),
        "classes[1]",
        "longer than 200 characters (1000 given)",
    ),
]


@pytest.mark.parametrize(
    ("spec", "field", "fragment"),
    [case[1:] for case in EMBEDDED_REFUSALS],
    ids=[case[0] for case in EMBEDDED_REFUSALS],
)
def test_embedded_spec_refusals_name_the_field_inside_the_files_graft_spec(
    tmp_path: Path, storage: Storage, spec: dict[str, Any] | str, field: str, fragment: str
) -> None:
    text = spec if isinstance(spec, str) else json.dumps(spec)
    error = refused(storage, embedded(tmp_path, text))
    assert error.param == "weights"
    assert "the file's graft_spec" in error.message
    assert f"{field}: " in error.message if field else True
    assert fragment in error.message, error.message
    # The message can always be sent as JSON (no lone surrogate is echoed back).
    error.message.encode("utf-8")


def test_a_graft_spec_longer_than_any_export_is_refused_before_parsing(
    tmp_path: Path, storage: Storage, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(importing, "MAX_SPEC_CHARS", 1000)
    error = refused(
        storage, embedded(tmp_path, json.dumps(graft_spec("cnn-small", classes=["x" * 10] * 100)))
    )
    assert error.param == "weights" and "longer than 1000 characters" in error.message


def test_a_configured_class_limit_applies_to_the_embedded_spec(tmp_path: Path, storage: Storage) -> None:
    spec = json.dumps(graft_spec("cnn-small", classes=["cat", "dog", "fox"]))
    error = refused(storage, embedded(tmp_path, spec), max_classes=2)
    assert error.param == "weights" and "at most 2 classes (3 given)" in error.message
    error = refused(storage, embedded(tmp_path, spec), max_class_chars=2)
    assert "classes[0]: is longer than 2 characters" in error.message
    columns = json.dumps(graft_spec("mlp"))
    error = refused(storage, embedded(tmp_path, columns), max_column_chars=5)
    assert "input_spec.feature_columns[0]: is longer than 5 characters" in error.message


# ------------------------------------------------------------------------------------ the config part


CONFIG_REFUSALS: list[tuple[str, dict[str, Any] | str, str, str]] = [
    ("not JSON", "{architecture: cnn-small}", "config", "not valid JSON"),
    ("unknown architecture", {"architecture": "resnet-9000"}, "config.architecture", "architecture"),
    (
        "unknown field",
        {"architecture": "cnn-small", "depth": 3},
        "config.depth",
        "Extra inputs are not permitted",
    ),
    (
        "duplicate classes",
        {"architecture": "cnn-small", "classes": ["a", "b", "a"]},
        "config.classes",
        "config.classes[2]: 'a' is there twice",
    ),
    ("one class", {"architecture": "cnn-small", "classes": ["a"]}, "config.classes", "at least two classes"),
    (
        "too many classes",
        {"architecture": "cnn-small", "classes": [str(i) for i in range(1001)]},
        "config.classes",
        "at most 1000 classes (1001 given)",
    ),
    (
        "long class",
        {"architecture": "cnn-small", "classes": ["a", "b" * 201]},
        "config.classes",
        "config.classes[1]: is longer than 200 characters",
    ),
    (
        "NUL in a class",
        {"architecture": "cnn-small", "classes": ["a", "b\x00"]},
        "config.classes",
        "NUL character",
    ),
    (
        "raw NUL in the part",
        '{"architecture": "cnn-small", "classes": ["a", "b\x00"]}',
        "config",
        "cannot be stored",
    ),
    (
        "huge hidden layers",
        {"architecture": "mlp", "feature_columns": COLUMNS, "hidden": [12000, 12000]},
        "config.hidden",
        "integers from 1 to 4096",
    ),
    (
        "hidden sizes as text",
        {"architecture": "mlp", "feature_columns": COLUMNS, "hidden": ["64"]},
        "config.hidden",
        "valid integer",
    ),
    (
        "hidden as text",
        {"architecture": "mlp", "feature_columns": COLUMNS, "hidden": "64"},
        "config.hidden",
        "valid list",
    ),
    (
        "hidden for a cnn",
        {"architecture": "cnn-small", "hidden": [64]},
        "config.hidden",
        "does not apply to cnn-small (its options: width)",
    ),
    (
        "mlp without columns",
        {"architecture": "mlp", "classes": ["a", "b"]},
        "config.feature_columns",
        "an mlp needs its feature_columns",
    ),
    (
        "mlp with no columns",
        {"architecture": "mlp", "feature_columns": []},
        "config.feature_columns",
        "an mlp needs its feature_columns",
    ),
    (
        "columns for a cnn",
        {"architecture": "cnn-small", "feature_columns": ["a"]},
        "config.feature_columns",
        "does not apply to cnn-small",
    ),
    (
        "duplicate columns",
        {"architecture": "mlp", "feature_columns": ["a", "a"]},
        "config.feature_columns",
        "config.feature_columns[1]: 'a' is there twice",
    ),
    (
        "long column",
        {"architecture": "mlp", "feature_columns": ["a" * 201]},
        "config.feature_columns",
        "longer than 200 characters",
    ),
    (
        "minilm 7 layers",
        {"architecture": "minilm-l6", "layers": 7},
        "config.layers",
        "integer from 1 to 6 (7 given)",
    ),
    (
        "layers for an mlp",
        {"architecture": "mlp", "feature_columns": COLUMNS, "layers": 2},
        "config.layers",
        "does not apply to mlp",
    ),
    ("cnn width 2", {"architecture": "cnn-small", "width": 2}, "config.width", "integer from 4 to 256"),
    (
        "max_length 1000",
        {"architecture": "minilm-l6", "max_length": 1000},
        "config.max_length",
        "integer from 8 to 512",
    ),
    (
        "max_length for a cnn",
        {"architecture": "cnn-small", "max_length": 64},
        "config.max_length",
        "does not apply to cnn-small",
    ),
    (
        "max_length as text",
        {"architecture": "minilm-l6", "max_length": "64"},
        "config.max_length",
        "valid integer",
    ),
]


@pytest.mark.parametrize(
    ("config", "param", "fragment"),
    [case[1:] for case in CONFIG_REFUSALS],
    ids=[case[0] for case in CONFIG_REFUSALS],
)
def test_config_part_refusals_name_the_config_field(
    tmp_path: Path, storage: Storage, config: dict[str, Any] | str, param: str, fragment: str
) -> None:
    error = refused(storage, with_config(tmp_path, config))
    assert error.param == param
    assert fragment in error.message, error.message


def test_configured_limits_apply_to_the_config_part(tmp_path: Path, storage: Storage) -> None:
    config = {"architecture": "cnn-small", "classes": ["cat", "dog", "fox"]}
    error = refused(storage, with_config(tmp_path, config), max_classes=2)
    assert error.param == "config.classes" and "at most 2 classes (3 given)" in error.message
    error = refused(storage, with_config(tmp_path, config), max_class_chars=2)
    assert (
        error.param == "config.classes" and "config.classes[0]: is longer than 2 characters" in error.message
    )
    config = {"architecture": "mlp", "feature_columns": ["long_name"]}
    error = refused(storage, with_config(tmp_path, config), max_column_chars=4)
    assert error.param == "config.feature_columns"


def test_both_ways_in_go_through_the_same_validation() -> None:
    """The config part becomes the spec an export of the same model would carry."""
    config = ImportConfig(architecture="mlp", classes=["a", "b"], feature_columns=COLUMNS, hidden=[16])
    assert importing.spec_from_config(config).model_dump() == graft_spec("mlp", classes=["a", "b"])
    student = ImportConfig(architecture="minilm-l6", classes=["n", "p"], layers=2, max_length=64)
    spec = importing.spec_from_config(student)
    assert spec.options == {"layers": 2} and spec.input_spec["max_length"] == 64
    embedded_spec = importing.parse_embedded_spec(spec.to_metadata(), importing.ImportLimits())
    assert embedded_spec == spec


# ------------------------------------------------------------------------------------ tensors


EVERY_ARCHITECTURE = [
    ("minilm-l6", {}),
    ("minilm-l6", {"layers": 2}),
    ("efficientnet-lite0", {}),
    ("cnn-small", {}),
    ("cnn-small", {"width": 8}),
    ("mlp", {"in_features": 4, "hidden": [16, 8]}),
]


@pytest.mark.parametrize(("architecture", "options"), EVERY_ARCHITECTURE)
def test_the_meta_device_build_has_the_real_networks_tensors(
    architecture: str, options: dict[str, Any]
) -> None:
    spec = (
        ModelSpec.for_builtin(architecture)
        .with_classes(["a", "b", "c"])
        .model_copy(update={"options": options})
    )
    expected, num_parameters = importing.expected_tensors(spec)
    assert all(tensor.is_meta for tensor in expected.values())
    real = build_model(spec, pretrained=False)
    assert {k: (v.shape, v.dtype) for k, v in expected.items()} == {
        k: (v.shape, v.dtype) for k, v in real.state_dict().items()
    }
    assert num_parameters == count_parameters(real)


def test_a_huge_spec_within_the_limits_is_checked_against_the_header_without_being_built(
    tmp_path: Path, storage: Storage
) -> None:
    """An mlp at every limit (10,000 columns, 8 layers of 4,096, 1,000 classes): some 160 M parameters, over
    the parameter limit, which the meta-device build counts without allocating; under a limit raised for
    it, the header is compared with that build, and the mismatch is found without allocating either."""
    columns = [f"f{i}" for i in range(10_000)]
    spec = graft_spec(
        "mlp",
        classes=[f"c{i}" for i in range(1000)],
        options={"in_features": 10_000, "hidden": [4096] * 8},
        input_spec__feature_columns=columns,
    )
    _, num_parameters = importing.expected_tensors(
        importing.parse_embedded_spec(json.dumps(spec), importing.ImportLimits())
    )
    assert importing.MAX_PARAMETERS < 150_000_000 < num_parameters
    tensors = {"backbone.input_mean": torch.zeros(3)}
    over = refused(storage, embedded(tmp_path, json.dumps(spec), tensors))
    assert f"parameters; at most {importing.MAX_PARAMETERS}" in over.message
    error = refused(storage, embedded(tmp_path, json.dumps(spec), tensors), max_parameters=200_000_000)
    assert error.code == "tensor_mismatch"
    assert (
        "tensor 'backbone.input_mean' has shape [3]; mlp with 1000 classes expects [10000]" in error.message
    )


def test_a_network_over_the_parameter_limit_is_refused_before_it_is_built(
    tmp_path: Path, storage: Storage
) -> None:
    model = build_model(ModelSpec.for_builtin("cnn-small").with_classes(["a", "b"]), pretrained=False)
    tensors = {k: v.contiguous() for k, v in model.state_dict().items()}
    config = {"architecture": "cnn-small", "classes": ["a", "b"]}
    error = refused(storage, with_config(tmp_path, config, tensors), max_parameters=10_000)
    assert (
        error.param == "config"
        and f"a network of {count_parameters(model)} parameters; at most 10000" in error.message
    )
    error = refused(
        storage,
        embedded(tmp_path, json.dumps(graft_spec("cnn-small", classes=["a", "b"])), tensors),
        max_parameters=10_000,
    )
    assert error.param == "weights" and "graft_spec" in error.message


def test_tensor_refusals_come_from_the_header(tmp_path: Path, storage: Storage) -> None:
    spec = ModelSpec.for_builtin("cnn-small").with_classes(["a", "b"])
    tensors = {k: v.contiguous() for k, v in build_model(spec, pretrained=False).state_dict().items()}
    config = {"architecture": "cnn-small", "classes": ["a", "b", "c"]}
    error = refused(storage, with_config(tmp_path, config, tensors))
    assert error.code == "tensor_mismatch"
    assert (
        "tensor 'head.weight' has shape [2, 128]; cnn-small with 3 classes expects [3, 128]" in error.message
    )
    wrong_dtype = {
        **tensors,
        "backbone.conv_blocks.0.1.num_batches_tracked": torch.zeros((), dtype=torch.float32),
    }
    error = refused(storage, with_config(tmp_path, {**config, "classes": ["a", "b"]}, wrong_dtype))
    assert "num_batches_tracked' has dtype F32" in error.message
    extra = {**tensors, "backbone.extra": torch.zeros(1)}
    error = refused(storage, with_config(tmp_path, {**config, "classes": ["a", "b"]}, extra))
    assert "unexpected tensor 'backbone.extra' for cnn-small with 2 classes" in error.message


def test_a_header_with_too_many_tensors_is_refused(
    tmp_path: Path, storage: Storage, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(importing, "MAX_TENSORS", 50)
    tensors = {f"t{i}": torch.zeros(1) for i in range(51)}
    error = refused(storage, with_config(tmp_path, {"architecture": "cnn-small"}, tensors))
    assert error.param == "weights" and "51 tensors" in error.message


def test_not_a_safetensors_file(tmp_path: Path, storage: Storage) -> None:
    path = tmp_path / "weights.pt"
    path.write_bytes(b"\x80\x04\x95 a pickle, never unpickled")
    upload = ReceivedUpload(
        fields={"config": '{"architecture": "cnn-small"}'}, path=path, size=path.stat().st_size
    )
    error = refused(storage, upload)
    assert error.param == "weights" and "not a safetensors file" in error.message


# ------------------------------------------------------------------------------------ what Graft exports


def export_specs() -> list[ModelSpec]:
    """Specs as Graft's jobs register them (and write into the files GET /v1/models/{id}/content returns):
    fine-tuned and pretrained built-ins, distillation students, an mlp built for a dataset's columns."""
    mlp = ModelSpec.for_builtin("mlp")
    table = mlp.model_copy(
        update={
            "options": {"in_features": len(COLUMNS), "hidden": [128, 128]},
            "input_spec": {**mlp.input_spec, "feature_columns": COLUMNS},
        }
    )
    return [
        ModelSpec.for_builtin("minilm-l6").with_classes(["negative", "positive"]),
        ModelSpec.for_builtin("minilm-l6")
        .model_copy(update={"options": {"layers": 2}})
        .with_classes(["n", "p"]),
        ModelSpec.for_builtin("efficientnet-lite0").with_classes(["cat", "dog", "fox"]),
        ModelSpec.for_builtin("cnn-small"),  # a bare backbone from self-supervised pretraining
        ModelSpec.for_builtin("cnn-small")
        .model_copy(update={"options": {"width": 8}})
        .with_classes(["0", "1"]),
        table.with_classes(["setosa", "versicolor", "virginica"]),
        table.model_copy(update={"options": {"in_features": 4, "hidden": [64]}}).with_classes(["a", "b"]),
    ]


@pytest.mark.parametrize("spec", export_specs(), ids=lambda spec: f"{spec.architecture}{spec.options}")
def test_every_kind_of_graft_export_imports_with_its_own_spec(
    tmp_path: Path, storage: Storage, spec: ModelSpec
) -> None:
    model = build_model(spec, pretrained=False)
    path = tmp_path / "export.safetensors"
    save_weights(path, model.state_dict(), spec)
    upload = ReceivedUpload(fields={}, path=path, size=path.stat().st_size, sha256=sha256_file(path))
    prepared = importing.prepare_import(storage, upload)
    assert prepared.spec == spec
    assert prepared.num_parameters == count_parameters(model)
    assert not path.exists()
    stored = load_file(str(prepared.temp_path))
    assert stored.keys() == model.state_dict().keys()
    assert all(torch.equal(stored[k], v) for k, v in model.state_dict().items())
    prepared.temp_path.unlink()


@pytest.fixture(scope="module")
def database(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Settings, Principal]]:
    settings = Settings(home=tmp_path_factory.mktemp("graft-import"))
    prestart(settings)
    engine = make_engine(settings.effective_database_url)
    with session_scope(make_session_factory(engine)) as session:
        project = create_project(session, "imports")
    yield settings, Principal(project_id=project.id, key_id="key_test", role="member")
    engine.dispose()


def count_models(settings: Settings) -> int:
    engine = make_engine(settings.effective_database_url)
    with session_scope(make_session_factory(engine)) as session:
        result = session.scalar(select(func.count()).select_from(Model))
    engine.dispose()
    return int(result or 0)


def test_an_exported_file_round_trips_into_a_model_row(
    tmp_path: Path, database: tuple[Settings, Principal]
) -> None:
    settings, principal = database
    storage = Storage(settings.storage_dir)
    spec = export_specs()[-2]
    model = build_model(spec, pretrained=False)
    path = tmp_path / "export.safetensors"
    save_weights(path, model.state_dict(), spec)
    before = count_models(settings)
    engine = make_engine(settings.effective_database_url)
    with session_scope(make_session_factory(engine)) as session:
        upload = ReceivedUpload(fields={}, path=path, size=path.stat().st_size, sha256=sha256_file(path))
        row = importing.import_model(session, storage, principal, upload, max_classes=3, max_class_chars=20)
    engine.dispose()
    assert count_models(settings) == before + 1
    assert row.kind == "imported" and row.classes == ["setosa", "versicolor", "virginica"]
    assert ModelSpec.model_validate(row.spec) == spec
    assert row.num_parameters == count_parameters(model)
    weights = storage.path(row.weights_path)
    assert weights.stat().st_size == row.weights_bytes and sha256_file(weights) == row.weights_sha256
    assert not any(storage.tmp_dir.iterdir())


def test_a_refused_import_adds_no_row(tmp_path: Path, database: tuple[Settings, Principal]) -> None:
    settings, principal = database
    storage = Storage(settings.storage_dir)
    before = count_models(settings)
    engine = make_engine(settings.effective_database_url)
    upload = embedded(tmp_path, json.dumps(graft_spec("cnn-small", classes=["x", "x"])))
    with pytest.raises(Unprocessable), session_scope(make_session_factory(engine)) as session:
        importing.import_model(session, storage, principal, upload)
    engine.dispose()
    assert count_models(settings) == before
    assert not any(storage.tmp_dir.iterdir())
