"""Self-supervised pretraining over the API: pretrain on unlabelled data, then rank and fine-tune from it."""

from __future__ import annotations

from typing import Any

from graft.config import Settings
from tests.helpers import Api, digit_images, digits_table_csv, digits_zip, image_zip, unlabelled_csv
from tests.integration.conftest import succeeded

IMAGES = "image_classification"
TABULAR = "tabular_classification"


def test_contrastive_pretraining_on_unlabelled_images_gives_better_features(
    api: Api, settings: Settings
) -> None:
    pool = api.upload_ok(
        image_zip([(None, image) for _, image in digit_images(200, range(10), seed=3)]), "pool.zip", IMAGES
    )
    assert pool["labeled"] is False
    job = succeeded(
        api,
        settings,
        {
            "type": "pretrain",
            "method": "self_supervised",
            "base_model": "cnn-small",
            "training_dataset": pool["id"],
            "hyperparameters": {"epochs": 8},
            "seed": 0,
        },
    )
    assert job["transfer"] is None and job["hyperparameters"]["validation_split"] == 0.0
    losses = [c["metrics"]["train_loss"] for c in api.get(f"/v1/jobs/{job['id']}/checkpoints").json()["data"]]
    assert len(losses) == 8 and losses[-1] < losses[0]
    model = api.get(f"/v1/models/{job['result_model']}").json()
    assert model["kind"] == "pretrained" and model["classes"] == []
    assert model["lineage"] == {"parent_model": "cnn-small", "source_dataset": pool["id"], "job": job["id"]}

    labelled = api.upload_ok(digits_zip(100, classes=range(10), seed=4), "digits.zip", IMAGES)
    ranked = api.post(
        "/v1/transferability",
        json={"dataset": labelled["id"], "models": ["cnn-small", model["id"]], "metrics": ["logme"]},
    ).json()
    assert ranked["ranking"] == [model["id"], "cnn-small"], ranked["results"]

    # A later fine-tune starts from it like any other upstream model, and its report says what it gained.
    finetune = succeeded(
        api,
        settings,
        {
            "base_model": model["id"],
            "training_dataset": labelled["id"],
            "method": "linear_probe",
            "baseline": True,
            "hyperparameters": {"epochs": 5, "validation_split": 0.3},
        },
    )
    report = api.get(finetune["report_url"]).json()
    assert report["kind"] == "transfer" and report["budget"]["transferred"]["base_model"] == model["id"]


def test_a_denoising_autoencoder_pretrains_a_table_model(api: Api, settings: Settings) -> None:
    table = digits_table_csv(range(10), 300)
    pool = api.upload_ok(unlabelled_csv(table), "pool.csv", TABULAR)
    job = succeeded(
        api,
        settings,
        {
            "type": "pretrain",
            "method": "self_supervised",
            "base_model": "mlp",
            "training_dataset": pool["id"],
            "hyperparameters": {"epochs": 10},
        },
    )
    events = [
        e["message"] for e in api.get(f"/v1/jobs/{job['id']}/events", params={"limit": 100}).json()["data"]
    ]
    assert any("denoising autoencoder" in m for m in events)
    labelled = api.upload_ok(
        digits_table_csv(range(10), 200, offset=300), "digits.csv", TABULAR, label_column="digit"
    )
    finetune = succeeded(
        api,
        settings,
        {
            "base_model": job["result_model"],
            "training_dataset": labelled["id"],
            "hyperparameters": {"epochs": 10},
        },
    )
    assert finetune["metrics"]["val_accuracy"] > 0.5


def test_self_supervised_rules(api: Api) -> None:
    pool = api.upload_ok(
        image_zip([(None, image) for _, image in digit_images(10, seed=3)]), "pool.zip", IMAGES
    )
    labelled = api.upload_ok(digits_zip(10), "digits.zip", IMAGES)
    base = {
        "type": "pretrain",
        "method": "self_supervised",
        "base_model": "cnn-small",
        "training_dataset": pool["id"],
    }
    cases: list[tuple[dict[str, Any], str, str]] = [
        ({"type": "finetune"}, "method", "method_not_supported"),
        ({"validation_dataset": labelled["id"]}, "validation_dataset", "invalid_request"),
        ({"head": "new"}, "head", "invalid_request"),
        ({"method": "full"}, "training_dataset", "dataset_unlabeled"),
        ({"hyperparameters": {"lora_rank": 4}}, "hyperparameters.lora_rank", "invalid_request"),
    ]
    for change, param, code in cases:
        response = api.create_job({**base, **change})
        assert response.status_code == 422, (change, response.text)
        assert (response.json()["error"]["param"], response.json()["error"]["code"]) == (param, code), change
