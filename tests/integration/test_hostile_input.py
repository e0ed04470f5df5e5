"""Hostile and malformed input: always a clear 4xx, never a 500, nothing half-written."""

from __future__ import annotations

import io
import json
import zipfile
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from app.main import create_app
from graft.config import Settings
from tests.conftest import ADMIN_KEY
from tests.helpers import Api, new_project, png_bytes, sentiment_rows, text_csv


@pytest.fixture(scope="module")
def tabular_model(iris_model: tuple[Api, str, str]) -> tuple[Api, str]:
    return iris_model[0], iris_model[2]


def test_idempotent_create_with_unstorable_metadata_leaves_nothing(api: Api) -> None:
    dataset = api.upload_ok(text_csv(sentiment_rows(6)), "r.csv", "text_classification")
    body = json.dumps(
        {
            "type": "finetune",
            "base_model": "minilm-l6",
            "training_dataset": dataset["id"],
            "metadata": {"a": "\ud800"},
        }
    )
    response = api.post(
        "/v1/jobs", content=body, headers={"Content-Type": "application/json", "Idempotency-Key": "k1"}
    )
    assert response.status_code == 422
    assert response.json()["error"]["param"] == "metadata.a"
    listed = api.get("/v1/jobs")
    assert listed.status_code == 200 and listed.json()["data"] == []
    nul = api.create_job(
        {"base_model": "minilm-l6", "training_dataset": dataset["id"], "metadata": {"k": "a\x00"}}
    )
    assert nul.status_code == 422


@pytest.mark.parametrize(
    ("line", "fragment"),
    [
        ('{"text": "hello", "label": "\\ud800"}', "invalid (lone surrogate) character"),
        ('{"text": "hel\\u0000lo", "label": "a"}', "NUL character"),
        ("[" * 50_000 + "]" * 50_000, "invalid JSON"),
        ('{"text": "hello", "label": ' + "9" * 5000 + "}", "invalid JSON"),
    ],
)
def test_unusable_jsonl_is_refused(api: Api, line: str, fragment: str) -> None:
    data = (line + '\n{"text": "bye", "label": "b"}\n').encode()
    response = api.upload(data, "x.jsonl", "text_classification")
    assert response.status_code == 422, response.text[:300]
    assert fragment in response.json()["error"]["message"]
    assert "line 1" in response.json()["error"]["message"]


def test_tabular_numbers_beyond_float32_are_refused(api: Api) -> None:
    for value in ("1e300", "9" * 400):
        response = api.upload(f"a,b,label\n1,{value},x\n2,3,y\n".encode(), "t.csv", "tabular_classification")
        assert response.status_code == 422, response.text
        assert "row 1 (line 2), column 'b'" in response.json()["error"]["message"]


def test_damaged_archives_are_refused(api: Api) -> None:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as archive:
        archive.writestr("a/1.png", png_bytes(Image.new("L", (4, 4))))
        archive.writestr("b/2.png", png_bytes(Image.new("L", (4, 4))))
    data = bytearray(out.getvalue())
    # Claim UTF-8 names (general-purpose flag bit 11) for a name that is not UTF-8.
    central = data.find(b"PK\x01\x02")
    data[central + 9] |= 0x08
    data[central + 46] = 0xFF
    response = api.upload(bytes(data), "d.zip", "image_classification")
    assert response.status_code == 422, response.text
    assert "ZIP" in response.json()["error"]["message"]


def test_nul_in_ids_queries_and_fields(api: Api) -> None:
    assert api.get("/v1/datasets/ds_%00").status_code == 400
    assert api.get("/v1/jobs?after=job_%00").status_code == 400
    bad_field = api.upload(text_csv(sentiment_rows(4)), "r.csv", "text_classification", name="a\x00b")
    assert bad_field.status_code == 422 and bad_field.json()["error"]["param"] == "name"
    bad_project = Api(api.http, ADMIN_KEY).post("/v1/projects", json={"name": "a\x00"})
    assert bad_project.status_code == 422
    long_name = "x" * 400 + ".csv"
    dataset = api.upload_ok(text_csv(sentiment_rows(4)), long_name, "text_classification")
    assert dataset["filename"].endswith(".csv") and len(dataset["filename"]) == 300


def test_non_finite_hyperparameters_are_refused(api: Api) -> None:
    dataset = api.upload_ok(text_csv(sentiment_rows(6)), "r.csv", "text_classification")
    body = '{"type": "finetune", "base_model": "minilm-l6", "training_dataset": "%s", "hyperparameters": {"max_grad_norm": 1e999}}'
    response = api.post(
        "/v1/jobs", content=(body % dataset["id"]).encode(), headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 422
    assert response.json()["error"]["param"] == "hyperparameters.max_grad_norm"


def test_tabular_validation_needs_the_training_columns(api: Api) -> None:
    train = api.upload_ok(b"a,b,label\n1,2,x\n3,4,y\n5,6,x\n", "t.csv", "tabular_classification")
    validation = api.upload_ok(b"a,c,label\n1,2,x\n3,4,y\n", "v.csv", "tabular_classification")
    response = api.create_job(
        {"base_model": "mlp", "training_dataset": train["id"], "validation_dataset": validation["id"]}
    )
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "columns_mismatch"
    assert "'b'" in response.json()["error"]["message"]


@pytest.mark.parametrize(
    "payload",
    [
        b'{"inputs": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
        b'{"inputs": [{"sepal_length": '
        + b"9" * 400
        + b', "sepal_width": 1, "petal_length": 1, "petal_width": 1}]}',
        b'{"inputs": [{"sepal_length": 1e308, "sepal_width": 1, "petal_length": 1, "petal_width": 1}]}',
        b'{"inputs": [{"sepal_length": 1e999, "sepal_width": 1, "petal_length": 1, "petal_width": 1}]}',
        b"\xff\xfe not json",
    ],
    ids=["deep", "huge-int", "beyond-float32", "infinite", "not-utf8"],
)
def test_malformed_predictions_are_4xx(tabular_model: tuple[Api, str], payload: bytes) -> None:
    api, model_id = tabular_model
    response = api.post(
        f"/v1/models/{model_id}/predict", content=payload, headers={"Content-Type": "application/json"}
    )
    assert 400 <= response.status_code < 500, response.text[:300]
    assert set(response.json()["error"]) == {"code", "message", "param"}


@pytest.fixture
def small_body_api(settings: Settings) -> Iterator[Api]:
    limited = settings.model_copy(update={"max_request_bytes": 4096})
    with TestClient(create_app(limited)) as client:
        yield new_project(Api(client, ADMIN_KEY))


def test_request_bodies_are_capped_without_content_length(small_body_api: Api) -> None:
    payload: dict[str, Any] = {"name": "x" * 100}
    body = json.dumps({"pad": "y" * 10_000, **payload}).encode()

    def chunks() -> Iterator[bytes]:
        for start in range(0, len(body), 1000):
            yield body[start : start + 1000]

    admin = Api(small_body_api.http, ADMIN_KEY)
    chunked = admin.post("/v1/projects", content=chunks(), headers={"Content-Type": "application/json"})
    assert chunked.status_code == 413
    assert chunked.json()["error"]["code"] == "payload_too_large"
    declared = admin.post("/v1/projects", content=body, headers={"Content-Type": "application/json"})
    assert declared.status_code == 413
    # Dataset uploads stream to disk under their own, larger limit.
    assert (
        small_body_api.upload(text_csv(sentiment_rows(300)), "big.csv", "text_classification").status_code
        == 201
    )


def test_an_archive_of_a_hundred_thousand_tiny_files_is_refused_before_anything_is_written(
    api: Api, settings: Settings
) -> None:
    import time

    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_STORED) as archive:
        for i in range(100_000):
            archive.writestr(f"cats/{i}.png", b"x")
    datasets_before = (
        sorted((settings.storage_dir / "datasets").glob("*"))
        if (settings.storage_dir / "datasets").exists()
        else []
    )
    started = time.monotonic()
    response = api.upload(out.getvalue(), "flood.zip", "image_classification")
    elapsed = time.monotonic() - started
    assert response.status_code == 422, response.text
    assert f"at most {settings.max_archive_members} are allowed" in response.json()["error"]["message"]
    assert response.json()["error"]["param"] == "file"
    # Refused from the archive's directory alone: nothing extracted, nothing kept.
    assert list((settings.storage_dir / "tmp").iterdir()) == []
    datasets_after = (
        sorted((settings.storage_dir / "datasets").glob("*"))
        if (settings.storage_dir / "datasets").exists()
        else []
    )
    assert datasets_after == datasets_before
    print(f"100,000-member archive refused in {elapsed:.2f}s")
