"""The whole path over HTTP: upload, fine-tune on a real worker, poll, checkpoints, predict."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path
from typing import Any

import pytest
from safetensors import safe_open
from safetensors.torch import load

from graft.queueing import JobQueue
from tests.e2e.conftest import Stack
from tests.helpers import (
    Api,
    digit_images,
    digits_zip,
    iris_csv,
    png_bytes,
    sentiment_rows,
    text_csv,
    wait_for,
)

pytestmark = pytest.mark.e2e


def finished(api: Api, stack: Stack, job_id: str, timeout: float = 240) -> dict[str, Any]:
    try:
        return api.wait_job(job_id, timeout=timeout)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{stack.logs()}") from None


def test_text_linear_probe_end_to_end(stack: Stack) -> None:
    api = stack.project()
    dataset = api.upload_ok(text_csv(sentiment_rows(60)), "reviews.csv", "text_classification")
    created = api.create_job(
        {
            "base_model": "minilm-l6",
            "training_dataset": dataset["id"],
            "method": "linear_probe",
            "hyperparameters": {"epochs": 5},
        }
    )
    assert created.status_code == 201, created.text
    job_id = created.json()["id"]

    seen = set()

    def observe() -> dict[str, Any] | None:
        job = api.get(f"/v1/jobs/{job_id}").json()
        seen.add(job["status"])
        return job if job["status"] in ("succeeded", "failed", "cancelled") else None

    job = wait_for(observe, 240, interval=0.2, message="the text job")
    assert job["status"] == "succeeded", f"{job['error']}\n{stack.logs()}"
    assert "running" in seen or "queued" in seen
    assert job["started_at"] <= job["finished_at"]
    assert job["progress"]["epoch"] == 5 and job["progress"]["step"] == job["progress"]["total_steps"]
    assert set(job["metrics"]) >= {"train_loss", "val_loss", "val_accuracy"}
    assert job["metrics"]["val_accuracy"] >= 0.8

    events = api.get(f"/v1/jobs/{job_id}/events?limit=100").json()["data"]
    messages = [e["message"] for e in events]
    assert messages[0].startswith("Job created")
    assert messages[1].startswith("Job started")
    assert messages[-1].startswith("Job succeeded")
    metric_events = [e for e in events if e["type"] == "metrics"]
    assert [e["data"]["epoch"] for e in metric_events] == [1, 2, 3, 4, 5]
    assert [e["created_at"] for e in events] == sorted(e["created_at"] for e in events)
    page = api.get(f"/v1/jobs/{job_id}/events?limit=2&after={events[1]['id']}").json()
    assert [e["id"] for e in page["data"]] == [events[2]["id"], events[3]["id"]]

    checkpoints = api.get(f"/v1/jobs/{job_id}/checkpoints").json()["data"]
    assert [c["epoch"] for c in checkpoints] == [1, 2, 3, 4, 5]
    assert checkpoints[-1]["metrics"]["val_accuracy"] == job["metrics"]["val_accuracy"]
    content = api.get(f"/v1/checkpoints/{checkpoints[-1]['id']}/content")
    assert content.status_code == 200
    assert len(content.content) == checkpoints[-1]["bytes"]
    assert hashlib.sha256(content.content).hexdigest() == checkpoints[-1]["sha256"]
    tensors = load(content.content)
    assert sorted(tensors) == ["head.bias", "head.weight"]
    assert tuple(tensors["head.weight"].shape) == (2, 384)

    model_id = job["result_model"]
    model = api.get(f"/v1/models/{model_id}").json()
    assert model["classes"] == ["negative", "positive"]
    assert model["job_id"] == job_id and model["base_model"] == "minilm-l6" and model["kind"] == "finetuned"
    assert model_id in [m["id"] for m in api.get("/v1/models").json()["data"]]

    prediction = api.post(
        f"/v1/models/{model_id}/predict", json={"inputs": ["a truly wonderful film", "awful and boring"]}
    )
    assert prediction.status_code == 200, prediction.text
    predictions = prediction.json()["predictions"]
    assert [p["label"] for p in predictions] == ["positive", "negative"]
    for p in predictions:
        assert sum(p["probabilities"].values()) == pytest.approx(1.0, abs=1e-4)

    for body, status in [
        ({"inputs": [1, 2]}, 422),
        ({"inputs": []}, 422),
        ({"inputs": ["  "]}, 422),
        ({"text": ["x"]}, 422),
    ]:
        bad = api.post(f"/v1/models/{model_id}/predict", json=body)
        assert bad.status_code == status, (body, bad.text)
        assert bad.json()["error"]["param"]
    wrong_type = api.post(
        f"/v1/models/{model_id}/predict", content=b"hello", headers={"Content-Type": "text/plain"}
    )
    assert wrong_type.status_code == 415


def test_image_full_finetune_end_to_end(stack: Stack) -> None:
    api = stack.project()
    dataset = api.upload_ok(digits_zip(60, seed=1), "digits.zip", "image_classification")
    job = api.create_job(
        {
            "base_model": "cnn-small",
            "training_dataset": dataset["id"],
            "hyperparameters": {"epochs": 8, "batch_size": 16},
            "seed": 0,
        }
    ).json()
    job = finished(api, stack, job["id"])
    assert job["status"] == "succeeded", f"{job['error']}\n{stack.logs()}"
    model_id = job["result_model"]

    # Fresh digits in other sizes and colour modes than the training images.
    probes = digit_images(12, seed=7)
    files = []
    for i, (_, image) in enumerate(probes):
        if i % 3 == 0:
            image = image.convert("RGB").resize((100, 100))
        elif i % 3 == 1:
            image = image.convert("RGBA").resize((17, 23))
        files.append(("files", (f"probe{i}.png", png_bytes(image), "image/png")))
    response = api.post(f"/v1/models/{model_id}/predict", files=files)
    assert response.status_code == 200, response.text
    labels = [p["label"] for p in response.json()["predictions"]]
    assert len(labels) == 12 and set(labels) <= {"zero", "one"}
    expected = ["zero" if digit == 0 else "one" for digit, _ in probes]
    assert sum(a == b for a, b in zip(labels, expected, strict=True)) >= 9

    corrupt = api.post(
        f"/v1/models/{model_id}/predict", files=[("files", ("bad.png", b"\x89PNG not really", "image/png"))]
    )
    assert corrupt.status_code == 422
    assert "files[0]" in corrupt.json()["error"]["message"]
    as_json = api.post(f"/v1/models/{model_id}/predict", json={"inputs": ["x"]})
    assert as_json.status_code == 415


def test_tabular_end_to_end_and_input_checks(stack: Stack) -> None:
    api = stack.project()
    dataset = api.upload_ok(iris_csv(), "iris.csv", "tabular_classification", label_column="species")
    job = api.create_job(
        {"base_model": "mlp", "training_dataset": dataset["id"], "hyperparameters": {"epochs": 40}}
    ).json()
    job = finished(api, stack, job["id"])
    assert job["status"] == "succeeded", f"{job['error']}\n{stack.logs()}"
    assert job["metrics"]["val_accuracy"] >= 0.8
    model_id = job["result_model"]
    row = {"sepal_length": 5.1, "sepal_width": 3.5, "petal_length": 1.4, "petal_width": 0.2}
    response = api.post(f"/v1/models/{model_id}/predict", json={"inputs": [row]})
    assert response.status_code == 200
    assert response.json()["predictions"][0]["label"] == "setosa"
    missing = api.post(f"/v1/models/{model_id}/predict", json={"inputs": [row, {"sepal_length": 1}]})
    assert missing.status_code == 422
    assert "inputs[1] is missing the column 'sepal_width'" in missing.json()["error"]["message"]
    text = api.post(f"/v1/models/{model_id}/predict", json={"inputs": [{**row, "petal_width": "wide"}]})
    assert text.status_code == 422 and "'wide' is not a number" in text.json()["error"]["message"]


def test_cancel_a_running_job_frees_the_worker(stack: Stack) -> None:
    api = stack.project()
    dataset = api.upload_ok(iris_csv(), "iris.csv", "tabular_classification", label_column="species")
    long_job = api.create_job(
        {
            "base_model": "mlp",
            "training_dataset": dataset["id"],
            "hyperparameters": {"epochs": 1000, "batch_size": 1},
        }
    ).json()

    def training() -> bool:
        job = api.get(f"/v1/jobs/{long_job['id']}").json()
        return job["status"] == "running" and bool(job["progress"]) and job["progress"]["step"] > 0

    wait_for(training, 120, message="the long job to train")
    cancel = api.post(f"/v1/jobs/{long_job['id']}/cancel")
    assert cancel.status_code == 200 and cancel.json()["cancel_requested"] is True
    job = api.wait_job(long_job["id"], timeout=30)
    assert job["status"] == "cancelled"
    assert job["progress"]["epoch"] < 1000
    assert (
        api.get(f"/v1/jobs/{long_job['id']}/events?limit=100").json()["data"][-1]["message"]
        == "Job cancelled"
    )
    quick = api.create_job(
        {"base_model": "mlp", "training_dataset": dataset["id"], "hyperparameters": {"epochs": 2}}
    ).json()
    assert finished(api, stack, quick["id"], timeout=60)["status"] == "succeeded"


def test_an_error_in_training_fails_the_job_with_its_message(stack: Stack) -> None:
    api = stack.project()
    dataset = api.upload_ok(iris_csv(30), "iris.csv", "tabular_classification", label_column="species")
    # The stored file is damaged behind the service's back (a disk fault, an operator's mistake).
    stored = stack.settings.storage_dir / "datasets" / dataset["id"] / "data.csv"
    stored.write_bytes(stored.read_bytes() + b"1.0,2.0,oops,3.0,setosa\n")
    job = api.create_job({"base_model": "mlp", "training_dataset": dataset["id"]}).json()
    job = finished(api, stack, job["id"])
    assert job["status"] == "failed"
    assert job["error"]["code"] == "invalid_data"
    assert "row 31" in job["error"]["message"] and "petal_length" in job["error"]["message"]
    assert job["finished_at"] is not None and job["result_model"] is None
    last = api.get(f"/v1/jobs/{job['id']}/events?limit=100").json()["data"][-1]
    assert last["level"] == "error" and last["message"].startswith("Job failed")


def test_a_second_delivery_of_a_job_does_nothing(stack: Stack) -> None:
    api = stack.project()
    dataset = api.upload_ok(iris_csv(60), "iris.csv", "tabular_classification", label_column="species")
    job = api.create_job(
        {"base_model": "mlp", "training_dataset": dataset["id"], "hyperparameters": {"epochs": 3}}
    ).json()
    JobQueue(stack.settings).send(job["id"])  # the broker delivers the same job id again
    job = finished(api, stack, job["id"])
    assert job["status"] == "succeeded"
    wait_for(
        lambda: stack.worker_log.read_text().count(f"job {job['id']} is succeeded") >= 1,
        30,
        message="the duplicate",
    )
    events = [e["message"] for e in api.get(f"/v1/jobs/{job['id']}/events?limit=100").json()["data"]]
    assert sum(m.startswith("Job started") for m in events) == 1
    assert len(api.get(f"/v1/jobs/{job['id']}/checkpoints").json()["data"]) == 3


def test_separate_validation_dataset(stack: Stack, tmp_path: Path) -> None:
    api = stack.project()
    train = api.upload_ok(text_csv(sentiment_rows(40, seed=1)), "train.csv", "text_classification")
    validation = api.upload_ok(text_csv(sentiment_rows(10, seed=2)), "val.csv", "text_classification")
    job = api.create_job(
        {
            "base_model": "minilm-l6",
            "training_dataset": train["id"],
            "validation_dataset": validation["id"],
            "method": "linear_probe",
            "hyperparameters": {"epochs": 3},
        }
    ).json()
    job = finished(api, stack, job["id"])
    assert job["status"] == "succeeded", job["error"]
    events = [e["message"] for e in api.get(f"/v1/jobs/{job['id']}/events?limit=100").json()["data"]]
    assert "Data: 40 training and 10 validation examples, 2 classes" in events
    first = api.get(f"/v1/jobs/{job['id']}/checkpoints").json()["data"][0]
    path = tmp_path / "first.safetensors"
    path.write_bytes(api.get(f"/v1/checkpoints/{first['id']}/content").content)
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
    assert metadata["epoch"] == "1" and metadata["contains"] == "head" and metadata["job_id"] == job["id"]


def test_image_upload_with_unusual_images_trains(stack: Stack) -> None:
    """A ZIP wrapped in a folder, with JPEGs, palette and 16-bit images of many sizes."""
    import zipfile

    api = stack.project()
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as archive:
        for i, (digit, image) in enumerate(digit_images(24, seed=3)):
            folder = "zero" if digit == 0 else "one"
            variants = [
                image.convert("RGB").resize((40 + i, 30 + i)),
                image.convert("P"),
                image.convert("I;16"),
                image,
            ]
            variant = variants[i % 4]
            fmt = "JPEG" if variant.mode == "RGB" else "PNG"
            archive.writestr(
                f"my-digits/{folder}/{i}.{'jpg' if fmt == 'JPEG' else 'png'}", png_bytes(variant, fmt)
            )
        archive.writestr("__MACOSX/my-digits/._0.png", b"junk")
    dataset = api.upload_ok(out.getvalue(), "my-digits.zip", "image_classification")
    assert dataset["num_examples"] == 24 and dataset["columns"]["root"] == "my-digits/"
    job = api.create_job(
        {"base_model": "cnn-small", "training_dataset": dataset["id"], "hyperparameters": {"epochs": 2}}
    ).json()
    assert finished(api, stack, job["id"])["status"] == "succeeded"


def test_an_upload_broken_at_90_percent_resumes_from_its_offset(stack: Stack) -> None:
    """A real connection to uvicorn, cut after 90% of the file: the bytes that arrived are kept, and the
    rest is sent from the offset the server reports."""
    import socket
    import time

    from tests.helpers import digits_table_csv, wait_for

    api = stack.project()
    data = digits_table_csv(range(10), 1500)
    created = api.post(
        "/v1/uploads",
        json={"filename": "digits.csv", "size": len(data), "sha256": hashlib.sha256(data).hexdigest()},
    )
    assert created.status_code == 201, created.text
    upload_id = created.json()["id"]
    cut = len(data) * 9 // 10
    head = (
        f"PATCH /v1/uploads/{upload_id} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {api.key}\r\n"
        f"Content-Type: application/offset+octet-stream\r\nUpload-Offset: 0\r\nContent-Length: {len(data)}\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", stack.settings.port)) as sock:
        sock.sendall(head + data[:cut])
        time.sleep(0.5)
    # The connection is gone mid-body; the server kept what arrived.
    offset = wait_for(
        lambda: api.get(f"/v1/uploads/{upload_id}").json()["offset"] == cut and cut, 30, message="the offset"
    )
    resumed = api.http.patch(
        f"/v1/uploads/{upload_id}",
        content=data[offset:],
        headers={
            "Authorization": f"Bearer {api.key}",
            "Content-Type": "application/offset+octet-stream",
            "Upload-Offset": str(offset),
        },
    )
    assert resumed.status_code == 200 and resumed.json()["complete"], resumed.text
    dataset = api.post(
        f"/v1/uploads/{upload_id}/dataset", json={"task": "tabular_classification", "label_column": "digit"}
    )
    assert dataset.status_code == 201, dataset.text
    assert dataset.json()["sha256"] == hashlib.sha256(data).hexdigest()
    assert dataset.json()["num_examples"] == 1500
