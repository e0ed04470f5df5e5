"""Distill jobs over the API: the rules, and a constructed case run by the real runner where the distilled
student beats the same student trained on the labels alone."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient

from graft.config import Settings
from tests.helpers import Api, digits_table_csv, new_project, sentiment_rows, text_csv, unlabelled_csv
from tests.integration.conftest import ADMIN_KEY, run_in_process

TABULAR = "tabular_classification"


@pytest.fixture(scope="module")
def teacher(client: TestClient, settings: Settings) -> tuple[Api, str, dict[str, str]]:
    """A project with an mlp teacher trained on 1000 digits (as a table), 150 other labelled digits to
    distil on (and the same without labels), and 300 more to evaluate on."""
    api = new_project(Api(client, ADMIN_KEY), "distillation")
    upload = lambda data, name: api.upload_ok(data, name, TABULAR, label_column="digit")["id"]  # noqa: E731
    data = {
        "teacher_data": upload(digits_table_csv(range(10), 1000), "teacher.csv"),
        "transfer": upload(digits_table_csv(range(10), 150, offset=1000), "transfer.csv"),
        "transfer_unlabelled": api.upload_ok(
            unlabelled_csv(digits_table_csv(range(10), 150, offset=1000)), "transfer-unlabelled.csv", TABULAR
        )["id"],
        "evaluation": upload(digits_table_csv(range(10), 300, offset=1400), "evaluation.csv"),
    }
    job = api.create_job({"base_model": "mlp", "training_dataset": data["teacher_data"], "seed": 0}).json()
    run_in_process(settings, job["id"])
    job = api.get(f"/v1/jobs/{job['id']}").json()
    assert job["status"] == "succeeded", job["error"]
    return api, job["result_model"], data


def distill(api: Api, teacher: str, **body: Any) -> Any:
    return api.create_job(
        {"type": "distill", "teacher": teacher, "student": {"architecture": "mlp", "hidden": [32]}, **body}
    )


def test_the_distilled_student_beats_the_student_alone(
    teacher: tuple[Api, str, dict[str, str]], settings: Settings
) -> None:
    api, model, data = teacher
    response = distill(
        api, model, training_dataset=data["transfer"], evaluation_dataset=data["evaluation"], seed=0
    )
    assert response.status_code == 201, response.text
    job = response.json()
    assert job["type"] == "distill" and job["base_model"] == model
    assert job["student"] == {"architecture": "mlp", "hidden": [32]}
    assert job["hyperparameters"]["temperature"] == 4.0 and job["hyperparameters"]["alpha"] == 0.5
    run_in_process(settings, job["id"])
    job = api.get(f"/v1/jobs/{job['id']}").json()
    assert job["status"] == "succeeded", job["error"]

    report = api.get(job["report_url"]).json()
    assert report["kind"] == "distillation" and report["evaluation_examples"] == 300
    teacher_arm, scratch, distilled = (
        report["teacher"],
        report["scratch_student"],
        report["distilled_student"],
    )
    assert distilled["accuracy"] > scratch["accuracy"] + 0.02, report["summary"]
    assert teacher_arm["accuracy"] > distilled["accuracy"]
    assert 0 < report["gap_recovered"] <= 1.2
    assert distilled["agreement_with_teacher"] > scratch["agreement_with_teacher"]
    assert teacher_arm["num_parameters"] > 5 * distilled["num_parameters"]
    assert teacher_arm["checkpoint_bytes"] > distilled["checkpoint_bytes"] > 0
    assert distilled["cpu_latency_ms"] > 0 and report["compression"]["parameters"] > 5
    assert report["learning_curves"]["distilled_student"] and report["learning_curves"]["scratch_student"]
    picture = api.get(job["report_url"], params={"format": "png"})
    assert picture.status_code == 200 and picture.content.startswith(b"\x89PNG")

    student = api.get(f"/v1/models/{job['result_model']}").json()
    assert student["kind"] == "distilled" and student["feature_dim"] == 32
    assert student["classes"] == [str(d) for d in range(10)]
    assert student["num_parameters"] == distilled["num_parameters"]
    evaluation = api.post(f"/v1/models/{student['id']}/evaluate", json={"dataset": data["evaluation"]}).json()
    assert evaluation["accuracy"] == pytest.approx(distilled["accuracy"])


def test_unlabelled_transfer_data_learn_from_the_teacher_alone(
    teacher: tuple[Api, str, dict[str, str]], settings: Settings
) -> None:
    api, model, data = teacher
    job = distill(
        api,
        model,
        training_dataset=data["transfer_unlabelled"],
        evaluation_dataset=data["evaluation"],
        hyperparameters={"epochs": 40},
    ).json()
    run_in_process(settings, job["id"])
    job = api.get(f"/v1/jobs/{job['id']}").json()
    assert job["status"] == "succeeded", job["error"]
    report = api.get(job["report_url"]).json()
    assert report["scratch_student"] is None and report["gap_recovered"] is None
    assert report["hyperparameters"]["alpha"] == 0.0
    assert report["distilled_student"]["accuracy"] > 0.6  # ten classes: chance is 0.1


def test_bad_distill_jobs_are_refused_naming_the_field(teacher: tuple[Api, str, dict[str, str]]) -> None:
    api, model, data = teacher
    texts = api.upload_ok(text_csv(sentiment_rows(20)), "reviews.csv", "text_classification")["id"]
    base = {"training_dataset": data["transfer"]}
    cases: list[tuple[dict[str, Any], int, str, str]] = [
        ({**base, "teacher": "mlp"}, 422, "teacher", "invalid_request"),
        ({**base, "teacher": "mdl_missing"}, 404, "teacher", "model_not_found"),
        (
            {**base, "student": {"architecture": "minilm-l6"}},
            422,
            "student.architecture",
            "modality_mismatch",
        ),
        ({**base, "student": {"architecture": "mlp", "layers": 2}}, 422, "student.layers", "invalid_request"),
        (
            {**base, "student": {"architecture": "mlp", "hidden": [0]}},
            422,
            "student.hidden",
            "invalid_request",
        ),
        ({**base, "student": {"architecture": "resnet"}}, 422, "student.architecture", "invalid_request"),
        ({**base, "backbone": "frozen"}, 422, "backbone", "invalid_request"),  # the mlp student is random
        ({"training_dataset": texts}, 422, "training_dataset", "modality_mismatch"),
        ({"training_dataset": data["transfer_unlabelled"]}, 422, "evaluation_dataset", "invalid_request"),
        (
            {**base, "evaluation_dataset": data["transfer_unlabelled"]},
            422,
            "evaluation_dataset",
            "dataset_unlabeled",
        ),
        ({**base, "hyperparameters": {"alpha": 1.5}}, 422, "hyperparameters.alpha", "invalid_request"),
        (
            {**base, "hyperparameters": {"temperature": 0}},
            422,
            "hyperparameters.temperature",
            "invalid_request",
        ),
    ]
    for body, status, param, code in cases:
        request = {"teacher": model, "student": {"architecture": "mlp", "hidden": [32]}, **body}
        response = api.create_job({"type": "distill", **request})
        assert response.status_code == status, (body, response.text)
        error = response.json()["error"]
        assert (error["param"], error["code"]) == (param, code), (body, error)
