"""Adapt jobs over the API: the rules checked before queueing, and a job run by the real runner on a
planted domain shift, with its report."""

from __future__ import annotations

from typing import Any

import pytest

from bench.common import review_rows
from graft.config import Settings
from tests.helpers import Api, iris_csv, product_rows, sentiment_rows, shifted_table_csv, text_csv, text_jsonl
from tests.integration.conftest import run_in_process

TABULAR = "tabular_classification"


@pytest.fixture
def shift(api: Api) -> dict[str, dict[str, Any]]:
    return {
        "source": api.upload_ok(shifted_table_csv(300, domain="source"), "source.csv", TABULAR),
        "target": api.upload_ok(
            shifted_table_csv(300, domain="target", with_labels=False), "target.csv", TABULAR
        ),
        "evaluation": api.upload_ok(
            shifted_table_csv(200, domain="target", seed=7), "evaluation.csv", TABULAR
        ),
    }


def all_events(api: Api, job_id: str) -> list[str]:
    messages: list[str] = []
    params: dict[str, Any] = {"limit": 100}
    while True:
        page = api.get(f"/v1/jobs/{job_id}/events", params=params).json()
        messages += [e["message"] for e in page["data"]]
        if not page["has_more"]:
            return messages
        params["after"] = page["data"][-1]["id"]


def adapt(api: Api, shift: dict[str, dict[str, Any]], **body: Any) -> Any:
    request = {
        "type": "adapt",
        "base_model": "mlp",
        "source_dataset": shift["source"]["id"],
        "target_dataset": shift["target"]["id"],
        **body,
    }
    return api.create_job(request)


def test_adapt_job_runs_every_method_beside_source_only_and_reports(
    api: Api, settings: Settings, shift: dict[str, dict[str, Any]]
) -> None:
    response = adapt(
        api, shift, evaluation_dataset=shift["evaluation"]["id"], methods=["mmd", "dann"], seed=0
    )
    assert response.status_code == 201, response.text
    job = response.json()
    assert job["type"] == "adapt" and job["methods"] == ["mmd", "dann"]
    assert job["training_dataset"] == shift["source"]["id"]
    assert job["target_dataset"] == shift["target"]["id"]
    assert job["evaluation_dataset"] == shift["evaluation"]["id"]
    assert job["hyperparameters"]["adaptation_weight"] == 1.0
    assert job["hyperparameters"]["epochs"] >= 1
    # The target is in use while the job is queued.
    busy = api.delete(f"/v1/datasets/{shift['target']['id']}")
    assert busy.status_code == 409 and busy.json()["error"]["code"] == "dataset_in_use"
    waiting = api.get(f"/v1/jobs/{job['id']}/report")
    assert waiting.status_code == 404 and "queued" in waiting.json()["error"]["message"]

    run_in_process(settings, job["id"])
    job = api.get(f"/v1/jobs/{job['id']}").json()
    assert job["status"] == "succeeded", job["error"]
    assert job["report_url"] == f"/v1/jobs/{job['id']}/report"
    model = api.get(f"/v1/models/{job['result_model']}").json()
    assert model["kind"] == "adapted" and "mmd" in model["name"]
    assert model["classes"] == ["neg", "pos"]

    report = api.get(job["report_url"]).json()
    assert report["kind"] == "adaptation" and report["job_id"] == job["id"]
    assert list(report["methods"]) == ["source_only", "mmd", "dann"]
    assert report["evaluation_examples"] == 200
    source_only = report["methods"]["source_only"]["target_accuracy"]["mean"]
    assert "mmd" in report["helped"] or "dann" in report["helped"], report["summary"]
    assert report["methods"][report["best_method"]]["target_accuracy"]["mean"] > source_only
    assert set(report["gain_over_source_only"]) == {"mmd", "dann"}
    picture = api.get(job["report_url"], params={"format": "png"})
    assert picture.status_code == 200 and picture.content.startswith(b"\x89PNG")
    events = all_events(api, job["id"])
    assert any(m.startswith("[source_only, seed 0]") for m in events), events[:5]
    assert any("On the target, source_only reached" in m for m in events)
    # The result model serves predictions like any other.
    rows = [{"x0": 2.0, "x1": 3.0, **{f"x{i}": 0.0 for i in range(2, 8)}}]
    prediction = api.post(f"/v1/models/{job['result_model']}/predict", json={"inputs": rows})
    assert prediction.status_code == 200, prediction.text


def test_bad_adapt_jobs_are_refused_naming_the_field(api: Api, shift: dict[str, dict[str, Any]]) -> None:
    texts = api.upload_ok(text_csv(sentiment_rows(20)), "reviews.csv", "text_classification")
    iris = api.upload_ok(iris_csv(), "iris.csv", TABULAR, label_column="species")
    cases: list[tuple[dict[str, Any], int, str, str]] = [
        ({"target_dataset": "ds_missing"}, 404, "target_dataset", "dataset_not_found"),
        ({"source_dataset": shift["target"]["id"]}, 422, "source_dataset", "dataset_unlabeled"),
        ({"target_dataset": texts["id"]}, 422, "target_dataset", "task_mismatch"),
        ({"target_dataset": iris["id"]}, 422, "target_dataset", "columns_mismatch"),
        ({"target_dataset": shift["source"]["id"]}, 422, "target_dataset", "invalid_request"),
        ({"evaluation_dataset": shift["target"]["id"]}, 422, "evaluation_dataset", "dataset_unlabeled"),
        ({"methods": ["source_only"]}, 422, "methods.0", "invalid_request"),
        ({"methods": ["dann", "dann"]}, 422, "methods", "invalid_request"),
        ({"methods": []}, 422, "methods", "invalid_request"),
        ({"base_model": "minilm-l6"}, 422, "base_model", "modality_mismatch"),
        (
            {"hyperparameters": {"pseudo_label_threshold": 1.5}},
            422,
            "hyperparameters.pseudo_label_threshold",
            "invalid_request",
        ),
        (
            {"hyperparameters": {"early_stopping": {}}},
            422,
            "hyperparameters.early_stopping",
            "invalid_request",
        ),
        ({"method": "lora"}, 422, "method", "invalid_request"),
        ({"backbone": "frozen"}, 422, "backbone", "invalid_request"),  # random mlp weights: nothing to freeze
        ({"backbone": "sideways"}, 422, "backbone", "invalid_request"),
    ]
    for body, status, param, code in cases:
        response = adapt(api, shift, **body)
        assert response.status_code == status, (body, response.text)
        error = response.json()["error"]
        assert (error["param"], error["code"]) == (param, code), (body, error)
    # Adaptation settings belong to adapt jobs.
    finetune = api.create_job(
        {
            "base_model": "mlp",
            "training_dataset": shift["source"]["id"],
            "hyperparameters": {"adaptation_weight": 2},
        }
    )
    assert finetune.status_code == 422
    assert finetune.json()["error"]["param"] == "hyperparameters.adaptation_weight"
    assert api.get("/v1/jobs").json()["data"] == []


def test_a_text_adapt_job_freezes_the_pretrained_backbone_by_default(api: Api, settings: Settings) -> None:
    task = "text_classification"
    films = api.upload_ok(text_csv(review_rows(160, seed=5)), "films.csv", task)
    unlabelled = [(text, None) for text, _ in product_rows(160, seed=6)]
    products = api.upload_ok(text_jsonl(unlabelled), "products.jsonl", task)
    evaluation = api.upload_ok(text_csv(product_rows(200, seed=7)), "products-eval.csv", task)
    request = {
        "type": "adapt",
        "base_model": "minilm-l6",
        "source_dataset": films["id"],
        "target_dataset": products["id"],
        "evaluation_dataset": evaluation["id"],
        "methods": ["mmd"],
    }
    full = api.create_job({**request, "backbone": "full"})
    assert full.status_code == 201, full.text
    assert full.json()["method"] == "full" and "adapter_hidden" not in full.json()["hyperparameters"]
    assert full.json()["hyperparameters"]["learning_rate"] == 5e-5  # the full fine-tune's own rate
    assert api.post(f"/v1/jobs/{full.json()['id']}/cancel").status_code == 200
    chosen = api.create_job({**request, "hyperparameters": {"learning_rate": 0.02}})
    assert chosen.json()["hyperparameters"]["learning_rate"] == 0.02  # the client's rate stands
    assert api.post(f"/v1/jobs/{chosen.json()['id']}/cancel").status_code == 200
    response = api.create_job(request)
    assert response.status_code == 201, response.text
    job = response.json()
    assert job["method"] == "linear_probe" and job["hyperparameters"]["adapter_hidden"] == 256
    assert job["hyperparameters"]["learning_rate"] == 1e-3  # the adapter's, not the linear probe's 1e-2
    run_in_process(settings, job["id"])
    job = api.get(f"/v1/jobs/{job['id']}").json()
    assert job["status"] == "succeeded", job["error"]
    events = all_events(api, job["id"])
    assert any("Reused cached backbone features" in m for m in events), events
    report = api.get(job["report_url"]).json()
    assert list(report["methods"]) == ["source_only", "mmd"] and report["evaluation_examples"] == 200
    model = api.get(f"/v1/models/{job['result_model']}").json()
    assert model["kind"] == "adapted"
    prediction = api.post(
        f"/v1/models/{job['result_model']}/predict", json={"inputs": ["the kettle broke after a week"]}
    )
    assert prediction.status_code == 200, prediction.text
