"""Dataset upload over HTTP: streamed, validated, stored atomically; clear 4xx for bad input."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from graft.config import Settings
from tests.conftest import ADMIN_KEY
from tests.helpers import Api, digits_zip, iris_csv, new_project, sentiment_rows, text_csv, text_jsonl


def stored_files(settings: Settings) -> set[Path]:
    return {p for p in settings.storage_dir.rglob("*") if p.is_file()}


def test_upload_text_csv(api: Api) -> None:
    data = text_csv(sentiment_rows(20))
    response = api.upload(data, "reviews.csv", "text_classification")
    assert response.status_code == 201, response.text
    dataset = response.json()
    assert dataset["id"].startswith("ds_")
    assert dataset["object"] == "dataset"
    assert dataset["name"] == "reviews.csv"
    assert dataset["format"] == "csv"
    assert dataset["num_examples"] == 20
    assert dataset["labeled"] is True
    assert dataset["classes"] == ["negative", "positive"]
    assert dataset["class_counts"] == {"negative": 10, "positive": 10}
    assert dataset["bytes"] == len(data)
    assert dataset["sha256"] == hashlib.sha256(data).hexdigest()
    assert dataset["columns"] == {"text_column": "text", "label_column": "label"}
    assert api.get(f"/v1/datasets/{dataset['id']}").json() == dataset
    content = api.get(f"/v1/datasets/{dataset['id']}/content")
    assert content.status_code == 200
    assert content.content == data


def test_upload_jsonl_with_custom_columns_and_name(api: Api) -> None:
    rows = [{"body": text, "sentiment": label} for text, label in sentiment_rows(8)]
    import json

    data = "\n".join(json.dumps(row) for row in rows).encode()
    dataset = api.upload_ok(
        data,
        "r.jsonl",
        "text_classification",
        text_column="body",
        label_column="sentiment",
        name="My reviews",
    )
    assert dataset["name"] == "My reviews"
    assert dataset["format"] == "jsonl"
    assert dataset["columns"] == {"text_column": "body", "label_column": "sentiment"}


def test_upload_unlabelled_text(api: Api) -> None:
    dataset = api.upload_ok(
        text_jsonl([(t, None) for t, _ in sentiment_rows(6)]), "u.jsonl", "text_classification"
    )
    assert dataset["labeled"] is False
    assert dataset["classes"] == [] and dataset["class_counts"] == {}


def test_upload_tabular_and_images(api: Api) -> None:
    iris = api.upload_ok(iris_csv(), "iris.csv", "tabular_classification", label_column="species")
    assert iris["num_examples"] == 150
    assert iris["classes"] == ["setosa", "versicolor", "virginica"]
    assert iris["columns"]["feature_columns"] == [
        "sepal_length",
        "sepal_width",
        "petal_length",
        "petal_width",
    ]
    images = api.upload_ok(digits_zip(12), "digits.zip", "image_classification")
    assert images["format"] == "zip"
    assert images["classes"] == ["one", "zero"]
    assert sum(images["class_counts"].values()) == 12
    assert images["columns"] == {"layout": "class_folders", "root": ""}


@pytest.mark.parametrize(
    ("data", "filename", "fields", "status", "param", "fragment"),
    [
        (
            b"text,label\nhello,a\n,b\nbye,a\n",
            "x.csv",
            {},
            422,
            "file",
            "row 2 (line 3), column 'text': empty text",
        ),
        (b"words,label\nhello,a\nbye,b\n", "x.csv", {}, 422, "text_column", "columns: words, label"),
        (b"text,label\nhello,a\nbye,a\n", "x.csv", {}, 422, "label_column", "single class"),
        (b"text,label\nh\xe9llo,a\nbye,b\n", "x.csv", {}, 422, "file", "UTF-8"),
        (b"text,label\nhello,a,extra\n", "x.csv", {}, 422, "file", "row 1"),
        (b'{"text": "a", "label": "x"}\n{"text": 5, "label": "y"}\n', "x.jsonl", {}, 422, "file", "line 2"),
        (b"text,label\nhello,a\n", "x.xlsx", {}, 422, "file", "unsupported file type"),
        (
            b"text,label\nhello,a\nbye,b\n",
            "x.csv",
            {"label_column": "nope"},
            422,
            "label_column",
            "'nope' not found",
        ),
        (b"text,label\nhello,a\nbye,b\n", "x.csv", {"colour": "red"}, 422, "colour", "unknown form field"),
        (b"", "x.csv", {}, 422, "file", "empty"),
    ],
)
def test_bad_text_uploads_name_the_problem(
    api: Api,
    settings: Settings,
    data: bytes,
    filename: str,
    fields: dict[str, str],
    status: int,
    param: str,
    fragment: str,
) -> None:
    before = stored_files(settings)
    response = api.upload(data, filename, "text_classification", **fields)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == param
    assert fragment in error["message"]
    assert stored_files(settings) == before, "a refused upload must leave no file behind"
    assert api.get("/v1/datasets").json()["data"] == []


def test_bad_tabular_and_image_uploads(api: Api) -> None:
    bad_number = api.upload(b"a,b,label\n1,2,x\n3,oops,y\n", "t.csv", "tabular_classification")
    assert bad_number.status_code == 422
    assert "row 2 (line 3), column 'b': 'oops' is not a number" in bad_number.json()["error"]["message"]
    not_zip = api.upload(b"not a zip at all", "images.zip", "image_classification")
    assert not_zip.status_code == 422 and "not a ZIP" in not_zip.json()["error"]["message"]
    csv_for_images = api.upload(iris_csv(10), "iris.csv", "image_classification")
    assert csv_for_images.status_code == 422 and "zip" in csv_for_images.json()["error"]["message"]


def test_task_and_file_are_required(api: Api) -> None:
    missing_task = api.post("/v1/datasets", files={"file": ("x.csv", b"text,label\na,b\n")})
    assert missing_task.status_code == 422 and missing_task.json()["error"]["param"] == "task"
    bad_task = api.upload(b"text,label\na,b\n", "x.csv", "speech_recognition")
    assert bad_task.status_code == 422 and bad_task.json()["error"]["param"] == "task"
    missing_file = api.post(
        "/v1/datasets", data={"task": "text_classification"}, files={"other": ("x", b"1")}
    )
    assert missing_file.status_code == 422
    not_multipart = api.post("/v1/datasets", json={"task": "text_classification"})
    assert not_multipart.status_code == 415
    assert not_multipart.json()["error"]["param"] == "file"


@pytest.fixture
def small_limit_api(settings: Settings) -> Iterator[tuple[Api, Settings]]:
    """The service with a 2 KiB upload limit, on the session's database and storage."""
    limited = settings.model_copy(update={"max_upload_bytes": 2048})
    with TestClient(create_app(limited)) as client:
        yield new_project(Api(client, ADMIN_KEY)), limited


def test_size_limit_is_enforced_while_reading(small_limit_api: tuple[Api, Settings]) -> None:
    api, settings = small_limit_api
    small = api.upload(text_csv(sentiment_rows(10)), "ok.csv", "text_classification")
    assert small.status_code == 201, small.text
    big = text_csv(sentiment_rows(400))
    assert len(big) > 2048
    response = api.upload(big, "big.csv", "text_classification")
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "payload_too_large"
    # Without Content-Length (chunked transfer) the limit holds too.
    body = b"".join(
        [
            b'--b\r\nContent-Disposition: form-data; name="task"\r\n\r\ntext_classification\r\n',
            b'--b\r\nContent-Disposition: form-data; name="file"; filename="big.csv"\r\n\r\n',
            big,
            b"\r\n--b--\r\n",
        ]
    )

    def chunks() -> Iterator[bytes]:
        for start in range(0, len(body), 512):
            yield body[start : start + 512]

    chunked = api.post(
        "/v1/datasets", content=chunks(), headers={"Content-Type": "multipart/form-data; boundary=b"}
    )
    assert chunked.status_code == 413
    leftovers = [p for p in (settings.storage_dir / "tmp").iterdir()]
    assert leftovers == []


def test_delete_dataset(api: Api, settings: Settings) -> None:
    dataset = api.upload_ok(text_csv(sentiment_rows(6)), "d.csv", "text_classification")
    folder = settings.storage_dir / "datasets" / dataset["id"]
    assert folder.is_dir()
    deleted = api.delete(f"/v1/datasets/{dataset['id']}")
    assert deleted.status_code == 200
    assert deleted.json() == {"id": dataset["id"], "object": "dataset", "deleted": True}
    assert api.get(f"/v1/datasets/{dataset['id']}").status_code == 404
    assert not folder.exists()
    assert api.delete(f"/v1/datasets/{dataset['id']}").status_code == 404


def test_delete_is_refused_while_a_queued_job_uses_the_dataset(api: Api) -> None:
    dataset = api.upload_ok(iris_csv(30), "iris.csv", "tabular_classification", label_column="species")
    job = api.create_job({"base_model": "mlp", "training_dataset": dataset["id"]}).json()
    refused = api.delete(f"/v1/datasets/{dataset['id']}")
    assert refused.status_code == 409
    assert job["id"] in refused.json()["error"]["message"]
    assert api.post(f"/v1/jobs/{job['id']}/cancel").json()["status"] == "cancelled"
    assert api.delete(f"/v1/datasets/{dataset['id']}").status_code == 200


def test_list_pagination(api: Api) -> None:
    ids = [
        api.upload_ok(text_csv(sentiment_rows(4, seed=i)), f"{i}.csv", "text_classification")["id"]
        for i in range(5)
    ]
    first = api.get("/v1/datasets?limit=2").json()
    assert first["object"] == "list"
    assert [d["id"] for d in first["data"]] == ids[::-1][:2]
    assert first["has_more"] is True
    second = api.get(f"/v1/datasets?limit=2&after={first['data'][-1]['id']}").json()
    assert [d["id"] for d in second["data"]] == ids[::-1][2:4]
    third = api.get(f"/v1/datasets?limit=2&after={second['data'][-1]['id']}").json()
    assert [d["id"] for d in third["data"]] == ids[:1]
    assert third["has_more"] is False
    bad_cursor = api.get("/v1/datasets?after=ds_nope")
    assert bad_cursor.status_code == 400 and bad_cursor.json()["error"]["param"] == "after"
    bad_limit = api.get("/v1/datasets?limit=1000")
    assert bad_limit.status_code == 422 and bad_limit.json()["error"]["param"] == "limit"
