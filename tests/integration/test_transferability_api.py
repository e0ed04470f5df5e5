"""POST /v1/transferability: scores, ranking, the shared feature cache, and the rules."""

from __future__ import annotations

from typing import Any

from graft.config import Settings
from tests.helpers import Api, digits_zip, iris_csv, sentiment_rows, text_csv
from tests.integration.conftest import run_in_process


def test_a_pretrained_upstream_model_ranks_above_random_weights(api: Api, settings: Settings) -> None:
    """Constructed case: cnn-small pretrained on digits 0-5 against the same architecture with random
    weights, for a downstream task on digits 6-9."""
    upstream = api.upload_ok(
        digits_zip(300, classes=range(6), seed=1), "digits-0-5.zip", "image_classification"
    )
    job = api.create_job(
        {
            "type": "pretrain",
            "base_model": "cnn-small",
            "training_dataset": upstream["id"],
            "hyperparameters": {"epochs": 8},
        }
    ).json()
    run_in_process(settings, job["id"])
    model = api.get(f"/v1/jobs/{job['id']}").json()["result_model"]
    assert model is not None
    downstream = api.upload_ok(
        digits_zip(100, classes=range(6, 10), seed=2), "digits-6-9.zip", "image_classification"
    )

    response = api.post(
        "/v1/transferability", json={"dataset": downstream["id"], "models": ["cnn-small", model]}
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "transferability" and body["dataset"] == downstream["id"]
    assert body["metrics"] == ["logme", "hscore", "leep", "nce"] and body["rank_by"] == "logme"
    assert body["ranking"] == [model, "cnn-small"], body["results"]
    random, trained = body["results"]
    assert (random["model"], trained["model"]) == ("cnn-small", model)
    assert trained["scores"]["logme"] > random["scores"]["logme"]
    assert trained["scores"]["hscore"] > random["scores"]["hscore"]
    assert trained["ranks"] == {"logme": 1, "hscore": 1, "leep": 1, "nce": 1}
    # Head metrics need a source head: the bare architecture has none.
    assert (
        random["source_head"] is False
        and random["scores"]["leep"] is None
        and random["ranks"]["leep"] is None
    )
    assert trained["source_head"] is True and trained["scores"]["leep"] <= 0 and trained["scores"]["nce"] <= 0
    assert body["examples"] == 100 and body["seconds"] >= trained["seconds"] > 0


def test_features_are_shared_with_the_feature_cache(api: Api) -> None:
    texts = api.upload_ok(text_csv(sentiment_rows(40)), "reviews.csv", "text_classification")
    request = {"dataset": texts["id"], "models": ["minilm-l6"], "metrics": ["logme"]}
    first = api.post("/v1/transferability", json=request).json()
    again = api.post("/v1/transferability", json=request).json()
    assert first["results"][0]["feature_cache_hit"] is False
    assert again["results"][0]["feature_cache_hit"] is True
    assert again["results"][0]["scores"] == first["results"][0]["scores"]
    # A stratified sample when the dataset is larger than max_examples.
    sampled = api.post("/v1/transferability", json={**request, "max_examples": 10}).json()
    assert sampled["examples"] == 10


def test_bad_requests_name_the_field(api: Api, iris_model: tuple[Api, str, str]) -> None:
    iris = api.upload_ok(iris_csv(), "iris.csv", "tabular_classification", label_column="species")
    unlabelled = api.upload_ok(b"text\nfine\ngreat\n", "texts.csv", "text_classification")
    other_model = iris_model[2]  # another project's model is not found here
    cases: list[tuple[dict[str, Any], int, str, str]] = [
        ({"dataset": "ds_missing", "models": ["mlp"]}, 404, "dataset", "dataset_not_found"),
        ({"dataset": unlabelled["id"], "models": ["minilm-l6"]}, 422, "dataset", "dataset_unlabeled"),
        ({"dataset": iris["id"], "models": ["mlp", "minilm-l6"]}, 422, "models.1", "modality_mismatch"),
        ({"dataset": iris["id"], "models": [other_model]}, 404, "models.0", "model_not_found"),
        ({"dataset": iris["id"], "models": []}, 422, "models", "invalid_request"),
        ({"dataset": iris["id"], "models": ["mlp", "mlp"]}, 422, "models", "invalid_request"),
        (
            {"dataset": iris["id"], "models": ["mlp"], "metrics": ["accuracy"]},
            422,
            "metrics.0",
            "invalid_request",
        ),
        ({"dataset": iris["id"], "models": ["mlp"], "rank_by": "leep"}, 422, "rank_by", "invalid_request"),
        (
            {"dataset": iris["id"], "models": ["mlp"], "metrics": ["hscore"], "rank_by": "logme"},
            422,
            "rank_by",
            "invalid_request",
        ),
    ]
    for body, status, param, code in cases:
        response = api.post("/v1/transferability", json=body)
        assert response.status_code == status, (body, response.text)
        error = response.json()["error"]
        assert (error["param"], error["code"]) == (param, code), (body, error)
