"""Import, export and evaluation of models over HTTP."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import load, save

from graft.config import Settings
from graft.spec import SPEC_METADATA_KEY, ModelSpec
from ml.networks import build_model
from tests.conftest import ADMIN_KEY
from tests.helpers import Api, iris_csv, new_project, sentiment_rows, text_csv
from tests.integration.conftest import run_in_process

ROW = {"sepal_length": 6.7, "sepal_width": 3.0, "petal_length": 5.2, "petal_width": 2.3}


def cnn_weights(classes: list[str]) -> bytes:
    model = build_model(ModelSpec.for_builtin("cnn-small").with_classes(classes), pretrained=False)
    return save({k: v.contiguous() for k, v in model.state_dict().items()})


def import_model(api: Api, weights: bytes, config: dict[str, object] | None) -> object:
    data = {"config": json.dumps(config)} if config is not None else {}
    return api.post("/v1/models", files={"weights": ("model.safetensors", weights)}, data=data)


def test_import_checks_every_tensor_against_the_architecture(api: Api, settings: Settings) -> None:
    weights = cnn_weights(["cat", "dog", "fox"])
    mismatch = import_model(api, weights, {"architecture": "cnn-small", "classes": ["cat", "dog"]})
    assert mismatch.status_code == 422
    error = mismatch.json()["error"]
    assert error["param"] == "weights" and error["code"] == "tensor_mismatch"
    assert (
        "tensor 'head.weight' has shape [3, 128]; cnn-small with 2 classes expects [2, 128]"
        in error["message"]
    )

    other_architecture = import_model(
        api, weights, {"architecture": "mlp", "classes": ["a", "b", "c"], "feature_columns": ["x"]}
    )
    assert other_architecture.status_code == 422
    assert "tensor 'backbone.input_mean' is missing" in other_architecture.json()["error"]["message"]

    tensors = load(weights)
    tensors["backbone.extra"] = torch.zeros(2)
    extra = import_model(api, save(tensors), {"architecture": "cnn-small", "classes": ["cat", "dog", "fox"]})
    assert (
        extra.status_code == 422 and "unexpected tensor 'backbone.extra'" in extra.json()["error"]["message"]
    )

    pickled = import_model(
        api, b"\x80\x04\x95 not a safetensors file", {"architecture": "cnn-small", "classes": []}
    )
    assert pickled.status_code == 422 and pickled.json()["error"]["param"] == "weights"
    bad_config = import_model(api, weights, {"architecture": "resnet-9000", "classes": []})
    assert bad_config.status_code == 422 and bad_config.json()["error"]["param"] == "config.architecture"
    no_config = import_model(api, weights, None)
    assert no_config.status_code == 422 and no_config.json()["error"]["param"] == "config"
    assert [m for m in api.get("/v1/models").json()["data"] if not m["builtin"]] == []
    assert not any((settings.storage_dir / "tmp").iterdir())

    imported = import_model(
        api, weights, {"architecture": "cnn-small", "classes": ["cat", "dog", "fox"], "name": "pets"}
    )
    assert imported.status_code == 201, imported.text
    model = imported.json()
    assert (
        model["kind"] == "imported" and model["name"] == "pets" and model["classes"] == ["cat", "dog", "fox"]
    )
    assert model["lineage"] == {"parent_model": None, "source_dataset": None, "job": None}
    assert model["config"]["architecture"] == "cnn-small"


def test_export_then_import_round_trip_predicts_the_same(
    iris_model: tuple[Api, str, str], tmp_path: Path
) -> None:
    api, _, model_id = iris_model
    content = api.get(f"/v1/models/{model_id}/content")
    assert content.status_code == 200
    assert content.headers["content-disposition"].endswith(f'{model_id}.safetensors"')
    tensors = load(content.content)
    assert "backbone.input_mean" in tensors and tensors["head.weight"].shape == (3, 128)
    again = import_model(api, content.content, None)  # an exported file carries its config
    assert again.status_code == 201, again.text
    copy = again.json()["id"]
    first = api.post(f"/v1/models/{model_id}/predict", json={"inputs": [ROW]}).json()["predictions"]
    second = api.post(f"/v1/models/{copy}/predict", json={"inputs": [ROW]}).json()["predictions"]
    assert first == second
    assert api.get("/v1/models/minilm-l6/content").status_code == 400
    assert api.get(f"/v1/models/{model_id}/adapter").status_code == 404


def test_evaluate_directly_and_as_a_job(
    iris_model: tuple[Api, str, str], settings: Settings, client: TestClient
) -> None:
    api, dataset_id, model_id = iris_model
    response = api.post(f"/v1/models/{model_id}/evaluate", json={"dataset": dataset_id})
    assert response.status_code == 200, response.text
    result = response.json()
    assert result["object"] == "evaluation" and result["num_examples"] == 150
    assert result["accuracy"] >= 0.8 and 0 < result["macro_f1"] <= 1
    matrix = result["confusion_matrix"]["matrix"]
    assert result["confusion_matrix"]["labels"] == ["setosa", "versicolor", "virginica"]
    assert sum(map(sum, matrix)) == 150
    assert result["accuracy"] == pytest.approx(sum(matrix[i][i] for i in range(3)) / 150)
    assert result["per_class"]["setosa"]["support"] == 50

    from app.main import create_app

    with TestClient(create_app(settings.model_copy(update={"evaluate_sync_max_examples": 100}))) as small:
        queued = Api(small, api.key).post(f"/v1/models/{model_id}/evaluate", json={"dataset": dataset_id})
    assert queued.status_code == 202, queued.text
    job = queued.json()
    assert job["object"] == "job" and job["type"] == "evaluate" and job["status"] == "queued"
    run_in_process(settings, job["id"])
    job = api.get(f"/v1/jobs/{job['id']}").json()
    assert job["status"] == "succeeded", job["error"]
    assert job["metrics"]["accuracy"] == result["accuracy"]
    assert job["metrics"]["confusion_matrix"] == result["confusion_matrix"]


def test_evaluate_refuses_what_it_cannot_score(iris_model: tuple[Api, str, str]) -> None:
    api, dataset_id, model_id = iris_model
    texts = api.upload_ok(text_csv(sentiment_rows(6)), "t.csv", "text_classification")
    assert (
        api.post(f"/v1/models/{model_id}/evaluate", json={"dataset": texts["id"]}).json()["error"]["code"]
        == "modality_mismatch"
    )
    others = api.upload_ok(
        b"sepal_length,sepal_width,petal_length,petal_width,species\n1,2,3,4,lily\n1,2,3,5,rose\n",
        "o.csv",
        "tabular_classification",
        label_column="species",
    )
    mismatch = api.post(f"/v1/models/{model_id}/evaluate", json={"dataset": others["id"]})
    assert mismatch.status_code == 422 and "lily" in mismatch.json()["error"]["message"]
    assert api.post("/v1/models/minilm-l6/evaluate", json={"dataset": dataset_id}).status_code == 400
    stranger = new_project(Api(api.http, ADMIN_KEY))
    assert stranger.post(f"/v1/models/{model_id}/evaluate", json={"dataset": dataset_id}).status_code == 404


def test_pretrain_registers_an_upstream_model_with_lineage(api: Api, settings: Settings) -> None:
    dataset = api.upload_ok(iris_csv(), "iris.csv", "tabular_classification", label_column="species")
    job = api.create_job(
        {
            "type": "pretrain",
            "base_model": "mlp",
            "training_dataset": dataset["id"],
            "hyperparameters": {"epochs": 10},
        }
    )
    assert job.status_code == 201, job.text
    assert job.json()["initialization"] == "random" and job.json()["type"] == "pretrain"
    run_in_process(settings, job.json()["id"])
    done = api.get(f"/v1/jobs/{job.json()['id']}").json()
    assert done["status"] == "succeeded", done["error"]
    model = api.get(f"/v1/models/{done['result_model']}").json()
    assert model["kind"] == "pretrained"
    assert model["lineage"] == {"parent_model": "mlp", "source_dataset": dataset["id"], "job": done["id"]}
    assert set(model["methods"]) == {"full", "linear_probe", "partial"}

    # Usable as a base model: the same label set is domain transfer (head kept), another is task transfer.
    domain = api.create_job(
        {"base_model": model["id"], "training_dataset": dataset["id"], "method": "linear_probe"}
    ).json()
    assert domain["transfer"] == {"kind": "domain", "head": "keep"}
    two = api.upload_ok(
        b"\n".join(line for line in iris_csv().split(b"\n") if b"virginica" not in line),
        "two.csv",
        "tabular_classification",
        label_column="species",
    )
    task = api.create_job(
        {"base_model": model["id"], "training_dataset": two["id"], "method": "partial"}
    ).json()
    assert task["transfer"] == {"kind": "task", "head": "new"}
    forced = api.create_job({"base_model": model["id"], "training_dataset": two["id"], "head": "keep"}).json()
    assert forced["transfer"] == {"kind": "task", "head": "keep"}
    assert api.get(f"/v1/jobs/{done['id']}/report").json()["error"]["code"] == "report_not_available"
    refused = api.create_job(
        {"type": "pretrain", "base_model": "mlp", "training_dataset": dataset["id"], "baseline": True}
    )
    assert refused.status_code == 422 and refused.json()["error"]["param"] == "baseline"


def spec_file(spec: object, tensors: dict[str, torch.Tensor] | None = None) -> bytes:
    """A safetensors file whose metadata carries `spec` as its graft_spec (JSON text as given, or dumped)."""
    text = spec if isinstance(spec, str) else json.dumps(spec)
    return save(tensors or {"x": torch.zeros(2)}, metadata={SPEC_METADATA_KEY: text})


def exported(base: str, /, **changes: object) -> dict[str, object]:
    """The graft_spec of a Graft export of `architecture`, with fields replaced (options, classes...)."""
    spec = ModelSpec.for_builtin(base).with_classes(["cat", "dog"]).model_dump()
    if base == "mlp":
        spec["options"] = {"in_features": 4, "hidden": [16]}
        spec["input_spec"] = {**spec["input_spec"], "feature_columns": list(ROW)}
    return {**spec, **changes}


HOSTILE_SPECS: dict[str, object] = {
    "unknown architecture": exported("cnn-small", architecture="resnet-9000"),
    "invalid JSON": '{"architecture": "mlp", "options": {',
    "nested JSON": "[" * 50_000 + "]" * 50_000,
    "not an object": '["mlp"]',
    "missing in_features": exported("mlp", options={"hidden": [16]}),
    "negative in_features": exported("mlp", options={"in_features": -1, "hidden": [16]}),
    "string hidden": exported("mlp", options={"in_features": 4, "hidden": "16"}),
    "huge hidden": exported("mlp", options={"in_features": 4, "hidden": [12000, 12000]}),
    "minilm 99 layers": exported("minilm-l6", options={"layers": 99}),
    "cnn width 0": exported("cnn-small", options={"width": 0}),
    "lone surrogate": '{"architecture": "cnn-small", "modality": "image", "classes": ["a", "\\ud800"]}',
    "NUL class": exported("cnn-small", classes=["a", "b\x00"]),
    "duplicate classes": exported("cnn-small", classes=["x", "x"]),
    "one class": exported("cnn-small", classes=["x"]),
    "20,000 classes of 1,000 characters": exported(
        "cnn-small", classes=[f"{i:05d}" + "c" * 995 for i in range(20_000)]
    ),
    "option of another architecture": exported("efficientnet-lite0", options={"hidden": [8]}),
    "modality of another architecture": exported("minilm-l6", modality="image"),
    "image size not its own": exported(
        "cnn-small", input_spec={"type": "image", "height": 4096, "width": 4096}
    ),
    "max_length past the encoder": exported("minilm-l6", input_spec={"type": "text", "max_length": 100_000}),
    "columns not in_features": exported("mlp", options={"in_features": 4000, "hidden": [16]}),
}


@pytest.mark.parametrize("case", list(HOSTILE_SPECS))
def test_a_hostile_embedded_spec_is_refused_with_a_json_4xx(api: Api, settings: Settings, case: str) -> None:
    response: Any = import_model(api, spec_file(HOSTILE_SPECS[case]), None)
    assert 400 <= response.status_code < 500, response.text[:500]
    error = response.json()["error"]
    assert error["param"] == "weights" and "graft_spec" in error["message"], error
    assert [m for m in api.get("/v1/models").json()["data"] if not m["builtin"]] == []
    assert not any((settings.storage_dir / "tmp").iterdir())


HOSTILE_CONFIGS: dict[str, tuple[dict[str, object], str]] = {
    "duplicate classes": ({"architecture": "cnn-small", "classes": ["a", "b", "a"]}, "config.classes"),
    "too many classes": (
        {"architecture": "cnn-small", "classes": [str(i) for i in range(1001)]},
        "config.classes",
    ),
    "long class": ({"architecture": "cnn-small", "classes": ["a", "b" * 201]}, "config.classes"),
    "huge hidden": (
        {"architecture": "mlp", "feature_columns": list(ROW), "hidden": [12000, 12000]},
        "config.hidden",
    ),
    "minilm 7 layers": ({"architecture": "minilm-l6", "layers": 7}, "config.layers"),
    "long column": ({"architecture": "mlp", "feature_columns": ["c" * 201]}, "config.feature_columns"),
}


@pytest.mark.parametrize("case", list(HOSTILE_CONFIGS))
def test_a_hostile_config_part_is_refused_naming_its_field(api: Api, case: str) -> None:
    config, param = HOSTILE_CONFIGS[case]
    response: Any = import_model(api, cnn_weights(["a", "b"]), config)
    assert response.status_code == 422, response.text[:500]
    assert response.json()["error"]["param"] == param


def test_a_spec_at_every_limit_is_checked_from_the_header_not_built(api: Api) -> None:
    """Some 160 M parameters at the limits (10,000 columns, 8 layers of 4,096, 1,000 classes): more than an
    import may have (GRAFT_MAX_IMPORT_PARAMETERS), counted without the network being allocated."""
    spec = exported(
        "mlp",
        classes=[f"c{i}" for i in range(1000)],
        options={"in_features": 10_000, "hidden": [4096] * 8},
        input_spec={"type": "tabular", "feature_columns": [f"f{i}" for i in range(10_000)]},
    )
    response: Any = import_model(api, spec_file(spec, {"backbone.input_mean": torch.zeros(3)}), None)
    assert response.status_code == 422
    assert "parameters; at most 64000000" in response.json()["error"]["message"]


def test_a_distilled_students_export_imports_with_its_own_options(api: Api, tmp_path: Path) -> None:
    from ml.weights import save_weights

    spec = (
        ModelSpec.for_builtin("cnn-small")
        .model_copy(update={"options": {"width": 8}})
        .with_classes(["a", "b"])
    )
    path = tmp_path / "student.safetensors"
    save_weights(path, build_model(spec, pretrained=False).state_dict(), spec)
    response: Any = import_model(api, path.read_bytes(), None)
    assert response.status_code == 201, response.text
    assert response.json()["config"]["options"] == {"width": 8}
