"""Job creation rules, idempotency, cancellation and listing, with no worker consuming the queue."""

from __future__ import annotations

import json
from typing import Any

import pytest

from graft.config import Settings
from graft.defaults import default_hyperparameters
from tests.helpers import Api, digits_zip, iris_csv, sentiment_rows, text_csv, text_jsonl


def queued_messages(settings: Settings) -> list[str]:
    """Job ids waiting in this session's broker queue."""
    if settings.uses_filesystem_broker:
        bodies = [
            p.read_text() for p in (settings.broker_dir / "queue").glob(f"*.{settings.worker_queue}.msg")
        ]
    else:
        import redis

        client = redis.Redis.from_url(settings.effective_broker_url)
        bodies = [raw.decode() for raw in client.lrange(settings.worker_queue, 0, -1)]
        client.close()
    ids = []
    for body in bodies:
        message = json.loads(body)
        ids.append(message["headers"]["argsrepr"].strip("[]()',\""))
    return ids


@pytest.fixture
def text_dataset(api: Api) -> dict[str, Any]:
    return api.upload_ok(text_csv(sentiment_rows(20)), "reviews.csv", "text_classification")


def test_create_job_resolves_defaults_and_queues_only_the_id(
    api: Api, settings: Settings, text_dataset: dict[str, Any]
) -> None:
    response = api.create_job(
        {
            "base_model": "minilm-l6",
            "training_dataset": text_dataset["id"],
            "method": "linear_probe",
            "hyperparameters": {"epochs": 3},
            "seed": 7,
            "metadata": {"team": "nlp"},
        }
    )
    assert response.status_code == 201, response.text
    job = response.json()
    assert job["id"].startswith("job_") and job["object"] == "job"
    assert job["status"] == "queued"
    assert job["hyperparameters"]["epochs"] == 3
    defaults = default_hyperparameters("minilm-l6", "linear_probe")
    # What was sent, defaults for the rest; fine-tuning learned weights keeps their batch-norm statistics.
    assert job["hyperparameters"] == {**defaults, "epochs": 3, "freeze_batch_norm": True}
    assert job["seed"] == 7 and job["metadata"] == {"team": "nlp"}
    assert job["progress"] is None and job["result_model"] is None and job["error"] is None
    assert job["created_at"] and job["started_at"] is None
    assert job["id"] in queued_messages(settings)
    events = api.get(f"/v1/jobs/{job['id']}/events").json()["data"]
    assert [e["message"] for e in events] == [
        f"Job created: linear_probe fine-tune of minilm-l6 on {text_dataset['id']}"
    ]


def test_seed_is_chosen_and_recorded_when_left_out(api: Api, text_dataset: dict[str, Any]) -> None:
    job = api.create_job({"base_model": "minilm-l6", "training_dataset": text_dataset["id"]}).json()
    assert isinstance(job["seed"], int)
    assert job["method"] == "full"


@pytest.mark.parametrize(
    ("body", "status", "param", "code"),
    [
        ({"base_model": "bert-huge"}, 404, "base_model", "model_not_found"),
        ({"training_dataset": "ds_missing"}, 404, "training_dataset", "dataset_not_found"),
        ({"validation_dataset": "ds_missing"}, 404, "validation_dataset", "dataset_not_found"),
        ({"base_model": "efficientnet-lite0"}, 422, "base_model", "modality_mismatch"),
        ({"method": "prompt_tuning"}, 422, "method", "invalid_request"),
        (
            {"method": "partial", "hyperparameters": {"lora_rank": 4}},
            422,
            "hyperparameters.lora_rank",
            "invalid_request",
        ),
        (
            {"method": "partial", "hyperparameters": {"unfreeze_blocks": 7}},
            422,
            "hyperparameters.unfreeze_blocks",
            "invalid_request",
        ),
        ({"head": "keep"}, 422, "head", "invalid_request"),
        ({"seeds": [1, 2]}, 422, "seeds", "invalid_request"),
        ({"baseline": True, "hyperparameters": {"validation_split": 0}}, 422, "baseline", "invalid_request"),
        ({"initialization": "random"}, 422, "initialization", "invalid_request"),
        ({"from_checkpoint": "ckpt_missing"}, 404, "from_checkpoint", "checkpoint_not_found"),
        ({"hyperparameters": {"epochs": 0}}, 422, "hyperparameters.epochs", "invalid_request"),
        ({"hyperparameters": {"learning_rate": -1}}, 422, "hyperparameters.learning_rate", "invalid_request"),
        ({"hyperparameters": {"epohcs": 3}}, 422, "hyperparameters.epohcs", "invalid_request"),
        ({"type": "transmogrify"}, 422, "type", "invalid_request"),
        ({"seed": -1}, 422, "seed", "invalid_request"),
    ],
)
def test_bad_jobs_are_refused_naming_the_field(
    api: Api, text_dataset: dict[str, Any], body: dict[str, Any], status: int, param: str, code: str
) -> None:
    request = {"base_model": "minilm-l6", "training_dataset": text_dataset["id"], **body}
    response = api.create_job(request)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == param
    assert error["code"] == code
    assert api.get("/v1/jobs").json()["data"] == []


def test_dataset_rules(api: Api, text_dataset: dict[str, Any]) -> None:
    unlabelled = api.upload_ok(
        text_jsonl([(t, None) for t, _ in sentiment_rows(6)]), "u.jsonl", "text_classification"
    )
    response = api.create_job({"base_model": "minilm-l6", "training_dataset": unlabelled["id"]})
    assert response.status_code == 422 and response.json()["error"]["param"] == "training_dataset"
    assert "no labels" in response.json()["error"]["message"]

    other_classes = api.upload_ok(
        text_csv([("fine", "neutral"), ("ok", "mixed")]), "v.csv", "text_classification"
    )
    response = api.create_job(
        {
            "base_model": "minilm-l6",
            "training_dataset": text_dataset["id"],
            "validation_dataset": other_classes["id"],
        }
    )
    assert response.status_code == 422
    assert response.json()["error"]["param"] == "validation_dataset"
    assert "mixed" in response.json()["error"]["message"]

    images = api.upload_ok(digits_zip(8), "d.zip", "image_classification")
    response = api.create_job(
        {
            "base_model": "minilm-l6",
            "training_dataset": text_dataset["id"],
            "validation_dataset": images["id"],
        }
    )
    assert response.status_code == 422 and response.json()["error"]["param"] == "validation_dataset"

    response = api.create_job(
        {"base_model": "cnn-small", "training_dataset": images["id"], "method": "linear_probe"}
    )
    assert response.status_code == 422
    assert response.json()["error"]["param"] == "method"
    assert "starts from random weights" in response.json()["error"]["message"]
    assert api.create_job({"base_model": "cnn-small", "training_dataset": images["id"]}).status_code == 201


def test_idempotency_key(api: Api, settings: Settings, text_dataset: dict[str, Any]) -> None:
    body = {"base_model": "minilm-l6", "training_dataset": text_dataset["id"], "method": "linear_probe"}
    first = api.create_job(body, headers={"Idempotency-Key": "run-1"})
    assert first.status_code == 201
    again = api.create_job(body, headers={"Idempotency-Key": "run-1"})
    assert again.status_code == 200
    assert again.json()["id"] == first.json()["id"]
    changed = api.create_job({**body, "method": "full"}, headers={"Idempotency-Key": "run-1"})
    assert changed.status_code == 409
    assert changed.json()["error"]["param"] == "Idempotency-Key"
    assert len(api.get("/v1/jobs").json()["data"]) == 1
    assert queued_messages(settings).count(first.json()["id"]) == 1
    other_key = api.create_job(body, headers={"Idempotency-Key": "run-2"})
    assert other_key.status_code == 201 and other_key.json()["id"] != first.json()["id"]


def test_idempotency_keys_are_per_project(api: Api, other: Api) -> None:
    mine = api.upload_ok(iris_csv(30), "i.csv", "tabular_classification", label_column="species")
    theirs = other.upload_ok(iris_csv(30), "i.csv", "tabular_classification", label_column="species")
    a = api.create_job(
        {"base_model": "mlp", "training_dataset": mine["id"]}, headers={"Idempotency-Key": "same"}
    )
    b = other.create_job(
        {"base_model": "mlp", "training_dataset": theirs["id"]}, headers={"Idempotency-Key": "same"}
    )
    assert a.status_code == b.status_code == 201
    assert a.json()["id"] != b.json()["id"]


def test_cancel_a_queued_job(api: Api, text_dataset: dict[str, Any]) -> None:
    job = api.create_job({"base_model": "minilm-l6", "training_dataset": text_dataset["id"]}).json()
    cancelled = api.post(f"/v1/jobs/{job['id']}/cancel")
    assert cancelled.status_code == 200
    assert cancelled.json()["status"] == "cancelled"
    assert cancelled.json()["finished_at"] is not None
    again = api.post(f"/v1/jobs/{job['id']}/cancel")
    assert again.status_code == 409
    assert again.json()["error"]["code"] == "job_not_cancellable"
    events = [e["message"] for e in api.get(f"/v1/jobs/{job['id']}/events").json()["data"]]
    assert events[-1] == "Job cancelled before it started"


def test_list_jobs_with_status_filter(api: Api, text_dataset: dict[str, Any]) -> None:
    ids = [
        api.create_job({"base_model": "minilm-l6", "training_dataset": text_dataset["id"]}).json()["id"]
        for _ in range(3)
    ]
    api.post(f"/v1/jobs/{ids[1]}/cancel")
    assert [j["id"] for j in api.get("/v1/jobs").json()["data"]] == ids[::-1]
    assert [j["id"] for j in api.get("/v1/jobs?status=queued").json()["data"]] == [ids[2], ids[0]]
    assert [j["id"] for j in api.get("/v1/jobs?status=cancelled").json()["data"]] == [ids[1]]
    assert api.get("/v1/jobs?status=exploded").status_code == 422


def test_models_list_builtins_and_pages(api: Api) -> None:
    models = api.get("/v1/models").json()
    ids = [m["id"] for m in models["data"]]
    assert ids == ["minilm-l6", "efficientnet-lite0", "resnet-small", "cnn-small", "mlp"]
    by_id = {m["id"]: m for m in models["data"]}
    assert by_id["minilm-l6"]["pretrained"] is True and by_id["minilm-l6"]["modality"] == "text"
    assert by_id["efficientnet-lite0"]["input_spec"]["height"] == 224
    assert by_id["cnn-small"]["pretrained"] is False
    assert by_id["mlp"]["num_parameters"] is None
    page = api.get("/v1/models?limit=3").json()
    assert page["has_more"] is True and len(page["data"]) == 3
    rest = api.get("/v1/models?limit=3&after=cnn-small").json()
    assert [m["id"] for m in rest["data"]] == ["mlp"] and rest["has_more"] is False
    assert (
        api.get("/v1/models/efficientnet-lite0").json()["num_parameters"]
        == by_id["efficientnet-lite0"]["num_parameters"]
    )
    assert api.get("/v1/models/mdl_nothing").status_code == 404
    builtin_predict = api.post("/v1/models/minilm-l6/predict", json={"inputs": ["hi"]})
    assert builtin_predict.status_code == 400
    assert "fine-tune it" in builtin_predict.json()["error"]["message"]


def test_small_datasets_get_enough_epochs_by_default(api: Api) -> None:
    """20 rows, 18 for training: one step per epoch at batch 32, so the default rises towards 400 steps,
    at most 4x the table's 30 epochs; an explicit choice is kept."""
    dataset = api.upload_ok(text_csv(sentiment_rows(20)), "r.csv", "text_classification")
    body = {"base_model": "minilm-l6", "training_dataset": dataset["id"], "method": "linear_probe"}
    assert api.create_job(body).json()["hyperparameters"]["epochs"] == 120
    assert api.create_job({**body, "hyperparameters": {"epochs": 7}}).json()["hyperparameters"]["epochs"] == 7
    larger = api.create_job({**body, "hyperparameters": {"batch_size": 4}}).json()["hyperparameters"]
    assert larger["epochs"] == 80  # 5 steps per epoch: 80 epochs are 400 steps
    full = api.create_job({**body, "method": "full"}).json()["hyperparameters"]
    assert full["epochs"] == 16 and full["head_warmup_epochs"] == 10  # 4 x the table's 4, and the warm-up


def test_a_split_too_small_to_choose_by_is_not_held_out(api: Api) -> None:
    """With an evaluation_dataset to measure the job on, a default split that would hold fewer than 20
    validation examples per class chooses nothing (the result is the last epoch anyway): every label
    trains, and the first event says why. Without one the split stays (the job's only held-out figure), as
    it does for the client's own split, model selection, early stopping, validation dataset, a large
    dataset and a baseline comparison."""
    task = "text_classification"
    small = api.upload_ok(text_csv(sentiment_rows(40)), "small.csv", task)
    large = api.upload_ok(text_csv(sentiment_rows(420, seed=2)), "large.csv", task)
    held = api.upload_ok(text_csv(sentiment_rows(30, seed=4)), "held.csv", task)
    body = {
        "base_model": "minilm-l6",
        "training_dataset": small["id"],
        "method": "linear_probe",
        "evaluation_dataset": held["id"],
    }

    def created(extra: dict[str, Any]) -> dict[str, Any]:
        response = api.create_job({**body, **extra})
        assert response.status_code == 201, response.text
        return response.json()

    def split(extra: dict[str, Any]) -> float:
        return created(extra)["hyperparameters"]["validation_split"]

    job = created({})
    assert job["hyperparameters"]["validation_split"] == 0.0
    first = api.get(f"/v1/jobs/{job['id']}/events").json()["data"][0]["message"]
    assert "all 40 labelled examples train" in first and "would hold about 4" in first, first
    assert split({"evaluation_dataset": None}) == 0.1
    assert split({"hyperparameters": {"validation_split": 0.2}}) == 0.2
    assert split({"hyperparameters": {"model_selection": "best"}}) == 0.1
    assert split({"hyperparameters": {"early_stopping": {"patience": 2}}}) == 0.1
    assert split({"validation_dataset": held["id"]}) == 0.1
    assert split({"training_dataset": large["id"]}) == 0.1  # 42 validation examples, 21 per class
    assert split({"baseline": True}) == 0.1  # its report follows both arms on the validation data
    # The epochs count the labels that train: 40 at batch 4 are 10 steps an epoch, 40 epochs for 400 steps
    # (the 36 a split would leave, 9 steps: 45 epochs).
    assert created({"hyperparameters": {"batch_size": 4}})["hyperparameters"]["epochs"] == 40


def test_small_data_rules_are_hyperparameters_with_named_refusals(api: Api) -> None:
    """resnet-small from scratch takes the rules' defaults; a value outside a rule's choices is a 422
    naming the field; the defaults table in /docs names the new architecture."""
    images = api.upload_ok(digits_zip(12), "d.zip", "image_classification")
    body = {"type": "pretrain", "base_model": "resnet-small", "training_dataset": images["id"]}
    created = api.create_job(body)
    assert created.status_code == 201, created.text
    hp = created.json()["hyperparameters"]
    assert (hp["augmentation"], hp["model_selection"], hp["batch_norm_statistics"]) == (
        "auto",
        "auto",
        "auto",
    )
    assert hp["learning_rate"] == 2e-3  # from scratch: the table's rate
    for key, value in (("augmentation", "flip"), ("model_selection", "median"), ("batch_norm_statistics", 1)):
        refused = api.create_job({**body, "hyperparameters": {key: value}})
        assert refused.status_code == 422, (key, refused.text)
        assert refused.json()["error"]["param"] == f"hyperparameters.{key}"
    assert "resnet-small" in api.get("/openapi.json").text


def test_evaluation_dataset_and_cross_validation_are_checked(api: Api, text_dataset: dict[str, Any]) -> None:
    images = api.upload_ok(digits_zip(12), "d.zip", "image_classification")
    held = api.upload_ok(text_csv(sentiment_rows(30, seed=4)), "held.csv", "text_classification")
    body = {"base_model": "minilm-l6", "training_dataset": text_dataset["id"], "method": "linear_probe"}
    ok = api.create_job({**body, "baseline": True, "evaluation_dataset": held["id"]})
    assert ok.status_code == 201, ok.text
    assert ok.json()["evaluation_dataset"] == held["id"]
    assert "cross_validation_folds" not in ok.json()["hyperparameters"]  # measured on the evaluation data
    wrong_task = api.create_job({**body, "evaluation_dataset": images["id"]})
    assert wrong_task.status_code == 422 and wrong_task.json()["error"]["param"] == "evaluation_dataset"
    pretrain = api.create_job({**body, "type": "pretrain", "evaluation_dataset": held["id"]})
    assert pretrain.status_code == 422 and "finetune" in pretrain.json()["error"]["message"]
    # A small training set with a baseline and no held-out data: cross-validated by default.
    folded = api.create_job({**body, "baseline": True}).json()
    assert folded["hyperparameters"]["cross_validation_folds"] >= 2
    one_fold = api.create_job({**body, "baseline": True, "hyperparameters": {"cross_validation_folds": 1}})
    assert one_fold.status_code == 422
    assert one_fold.json()["error"]["param"] == "hyperparameters.cross_validation_folds"
    nothing = api.create_job(
        {**body, "baseline": True, "hyperparameters": {"validation_split": 0.0, "cross_validation_folds": 0}}
    )
    assert nothing.status_code == 422 and "evaluation_dataset" in nothing.json()["error"]["message"]


def test_baseline_arms_are_checked_run_and_reported(api: Api, settings: Settings) -> None:
    from tests.integration.conftest import succeeded

    task = "tabular_classification"
    train = api.upload_ok(iris_csv(90, seed=1), "iris.csv", task, label_column="species")
    held = api.upload_ok(iris_csv(150, seed=2), "iris-held.csv", task, label_column="species")

    pretrain = {"type": "pretrain", "training_dataset": train["id"], "hyperparameters": {"epochs": 20}}
    first = succeeded(api, settings, {**pretrain, "base_model": "mlp"})["result_model"]  # from random weights
    second = succeeded(api, settings, {**pretrain, "base_model": first})["result_model"]  # its parent: first
    body = {"base_model": second, "training_dataset": train["id"], "evaluation_dataset": held["id"]}
    refusals: list[tuple[Any, int, str, str]] = [
        (["parent"], 422, "baseline.0", "invalid_request"),  # on `first`: made from random weights
        ([], 422, "baseline", "invalid_request"),
        (["as_is", "as_is"], 422, "baseline", "invalid_request"),
        (["scratch", "as_is", "parent", first, "mlp"], 422, "baseline", "invalid_request"),
        (["mdl_missing"], 404, "baseline.0", "model_not_found"),
        (["minilm-l6"], 422, "baseline.0", "modality_mismatch"),
        ([second], 422, "baseline.0", "invalid_request"),  # the job's own base model
    ]
    for arms, status, param, code in refusals:
        base = first if arms == ["parent"] else second
        response = api.create_job({**body, "base_model": base, "baseline": arms})
        assert response.status_code == status, (arms, response.text)
        assert (response.json()["error"]["param"], response.json()["error"]["code"]) == (param, code), arms
    texts = api.upload_ok(text_csv(sentiment_rows(20)), "reviews.csv", "text_classification")
    no_head = api.create_job(
        {"base_model": "minilm-l6", "training_dataset": texts["id"], "baseline": ["as_is"]}
    )
    assert no_head.status_code == 422 and no_head.json()["error"]["param"] == "baseline.0"
    assert "as_is" in no_head.json()["error"]["message"]

    job = succeeded(api, settings, {**body, "method": "linear_probe", "baseline": ["parent", "as_is"]})
    assert job["baseline"] is True and job["baseline_arms"] == ["scratch", "parent", "as_is"]
    report = api.get(f"/v1/jobs/{job['id']}/report").json()
    assert set(report["arms"]) == {"parent", "as_is"}
    assert report["arms"]["parent"]["base_model"] == first and report["arms"]["parent"]["kind"] == "parent"
    for arm in report["arms"].values():
        assert arm["held_out"]["examples"] == 150
        assert isinstance(arm["negative_transfer"], bool)
        assert arm["transferred_accuracy"] == pytest.approx(report["held_out"]["transferred_accuracy"])
    assert "Against parent" in report["summary"] and "Against as_is" in report["summary"]


def test_semi_supervised_finetune_is_checked_and_runs(api: Api, settings: Settings) -> None:
    from tests.helpers import shifted_table_csv
    from tests.integration.conftest import run_in_process

    task = "tabular_classification"
    train = api.upload_ok(shifted_table_csv(40, domain="target"), "few.csv", task)
    unlabeled = api.upload_ok(
        shifted_table_csv(200, domain="target", seed=3, with_labels=False), "u.csv", task
    )
    texts = api.upload_ok(text_csv(sentiment_rows(20)), "reviews.csv", "text_classification")
    body = {"base_model": "mlp", "training_dataset": train["id"], "unlabeled_dataset": unlabeled["id"]}
    refusals: list[tuple[dict[str, Any], str]] = [
        ({"type": "pretrain"}, "unlabeled_dataset"),
        ({"unlabeled_dataset": train["id"]}, "unlabeled_dataset"),
        ({"unlabeled_dataset": texts["id"]}, "unlabeled_dataset"),
        (
            {"unlabeled_dataset": None, "hyperparameters": {"confidence_threshold": 0.9}},
            "hyperparameters.confidence_threshold",
        ),
        ({"hyperparameters": {"unlabeled_ratio": 99}}, "hyperparameters.unlabeled_ratio"),
    ]
    for change, param in refusals:
        response = api.create_job({**body, **change})
        assert response.status_code == 422, (change, response.text)
        assert response.json()["error"]["param"] == param, (change, response.json())
    created = api.create_job({**body, "hyperparameters": {"epochs": 5, "unlabeled_ratio": 2}})
    assert created.status_code == 201, created.text
    job = created.json()
    assert job["unlabeled_dataset"] == unlabeled["id"]
    assert {
        k: job["hyperparameters"][k] for k in ("unlabeled_weight", "confidence_threshold", "unlabeled_ratio")
    } == {
        "unlabeled_weight": 1.0,
        "confidence_threshold": 0.95,
        "unlabeled_ratio": 2,
    }
    busy = api.delete(f"/v1/datasets/{unlabeled['id']}")
    assert busy.status_code == 409 and busy.json()["error"]["code"] == "dataset_in_use"
    run_in_process(settings, job["id"])
    job = api.get(f"/v1/jobs/{job['id']}").json()
    assert job["status"] == "succeeded", job["error"]
    assert "pseudo_label_share" in job["metrics"]
