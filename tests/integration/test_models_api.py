"""Import, export and evaluation of models over HTTP."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import load, save

from app.core.config import Settings
from tests.conftest import ADMIN_KEY
from tests.helpers import Api, iris_csv, new_project, sentiment_rows, text_csv
from tests.integration.conftest import run_in_process
from workers.backbones.networks import build_model
from workers.backbones.spec import ModelSpec

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
