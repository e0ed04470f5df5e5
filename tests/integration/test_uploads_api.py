"""Resumable uploads through the API: chunks at offsets, checksums, limits (with and without
Content-Length), completion into a dataset, and abandoned uploads removed. A connection really broken at
90% and resumed: tests/e2e/test_service_end_to_end.py."""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Iterator
from datetime import timedelta

from fastapi.testclient import TestClient
from sqlalchemy import update

from app.main import create_app
from app.uploads.service import remove_abandoned
from graft.config import Settings
from graft.db import make_engine, make_session_factory, session_scope
from graft.ids import utcnow
from graft.storage import Storage
from graft.tables import Upload
from tests.conftest import ADMIN_KEY
from tests.helpers import Api, new_project, sentiment_rows, text_csv

CHUNK = {"Content-Type": "application/offset+octet-stream"}


def start(api: Api, data: bytes, filename: str = "reviews.csv", checksum: bool = True) -> dict:  # type: ignore[type-arg]
    body = {"filename": filename, "size": len(data)}
    if checksum:
        body["sha256"] = hashlib.sha256(data).hexdigest()  # type: ignore[assignment]
    response = api.post("/v1/uploads", json=body)
    assert response.status_code == 201, response.text
    return response.json()  # type: ignore[no-any-return]


def send(api: Api, upload_id: str, offset: int, chunk: bytes, **headers: str) -> object:
    return api.http.patch(
        f"/v1/uploads/{upload_id}",
        content=chunk,
        headers={"Authorization": f"Bearer {api.key}", **CHUNK, "Upload-Offset": str(offset), **headers},
    )


def checksum(chunk: bytes) -> str:
    return "sha256 " + base64.b64encode(hashlib.sha256(chunk).digest()).decode()


def part_size(settings: Settings, upload: dict) -> int:  # type: ignore[type-arg]
    return Storage(settings.storage_dir).path(f"uploads/{upload['id']}.part").stat().st_size


def test_a_file_sent_in_chunks_becomes_the_same_dataset_as_a_direct_upload(
    api: Api, settings: Settings
) -> None:
    data = text_csv(sentiment_rows(200))
    upload = start(api, data)
    assert upload["offset"] == 0 and not upload["complete"]
    third = len(data) // 3
    offset = 0
    for piece in (data[:third], data[third : 2 * third], data[2 * third :]):
        response = send(api, upload["id"], offset, piece, **{"Upload-Checksum": checksum(piece)})
        assert response.status_code == 200, response.text  # type: ignore[attr-defined]
        offset = response.json()["offset"]  # type: ignore[attr-defined]
    assert offset == len(data)
    assert api.get(f"/v1/uploads/{upload['id']}").json()["complete"] is True
    made = api.post(f"/v1/uploads/{upload['id']}/dataset", json={"task": "text_classification"})
    assert made.status_code == 201, made.text
    direct = api.upload_ok(data, "reviews.csv", "text_classification")
    for key in ("num_examples", "classes", "class_counts", "bytes", "sha256", "format", "name"):
        assert made.json()[key] == direct[key], key
    assert api.get(f"/v1/datasets/{made.json()['id']}/content").content == data
    # The upload was consumed, and its file moved (not copied).
    assert api.get(f"/v1/uploads/{upload['id']}").status_code == 404
    assert not (settings.storage_dir / "uploads" / f"{upload['id']}.part").exists()


def test_a_chunk_at_the_wrong_offset_gets_409_and_the_offset_to_resume_from(api: Api) -> None:
    data = text_csv(sentiment_rows(50))
    upload = start(api, data)
    assert send(api, upload["id"], 0, data[:100]).status_code == 200  # type: ignore[attr-defined]
    for wrong in (0, 50, 150):
        response = send(api, upload["id"], wrong, data[wrong : wrong + 10])
        assert response.status_code == 409  # type: ignore[attr-defined]
        assert response.headers["Upload-Offset"] == "100"  # type: ignore[attr-defined]
        assert response.json()["error"]["code"] == "offset_mismatch"  # type: ignore[attr-defined]
    missing = api.http.patch(
        f"/v1/uploads/{upload['id']}", content=b"x", headers={"Authorization": f"Bearer {api.key}", **CHUNK}
    )
    assert missing.status_code == 400 and missing.json()["error"]["param"] == "Upload-Offset"
    wrong_type = api.http.patch(
        f"/v1/uploads/{upload['id']}",
        content=b"x",
        headers={"Authorization": f"Bearer {api.key}", "Upload-Offset": "100", "Content-Type": "text/csv"},
    )
    assert wrong_type.status_code == 415


def test_nothing_goes_beyond_the_declared_size_with_or_without_content_length(
    api: Api, settings: Settings
) -> None:
    data = text_csv(sentiment_rows(50))
    upload = start(api, data)
    assert send(api, upload["id"], 0, data[:200]).status_code == 200  # type: ignore[attr-defined]
    too_long = send(api, upload["id"], 200, data[200:] + b"extra bytes")
    assert too_long.status_code == 413  # type: ignore[attr-defined]

    def chunked() -> Iterator[bytes]:  # no Content-Length: chunked transfer encoding
        rest = data[200:] + b"x" * 5000
        for i in range(0, len(rest), 1000):
            yield rest[i : i + 1000]

    response = api.http.patch(
        f"/v1/uploads/{upload['id']}",
        content=chunked(),
        headers={"Authorization": f"Bearer {api.key}", **CHUNK, "Upload-Offset": "200"},
    )
    assert response.status_code == 413
    # Neither refused chunk left a byte behind.
    assert api.get(f"/v1/uploads/{upload['id']}").json()["offset"] == 200
    assert part_size(settings, upload) == 200
    too_big = api.post("/v1/uploads", json={"filename": "huge.csv", "size": settings.max_upload_bytes + 1})
    assert too_big.status_code == 413 and too_big.json()["error"]["param"] == "size"


def test_damaged_data_is_caught_by_the_checksums(api: Api, settings: Settings) -> None:
    data = text_csv(sentiment_rows(50))
    upload = start(api, data)
    bad = send(api, upload["id"], 0, data, **{"Upload-Checksum": checksum(data[:-1] + b"?")})
    assert bad.status_code == 422 and bad.json()["error"]["code"] == "checksum_mismatch"  # type: ignore[attr-defined]
    assert part_size(settings, upload) == 0
    # A whole file that differs from the declared SHA-256 never becomes a dataset.
    assert send(api, upload["id"], 0, data[:-1] + b"?").status_code == 200  # type: ignore[attr-defined]
    refused = api.post(f"/v1/uploads/{upload['id']}/dataset", json={"task": "text_classification"})
    assert refused.status_code == 422 and refused.json()["error"]["param"] == "sha256"
    assert api.get("/v1/datasets").json()["data"] == []


def test_an_incomplete_or_invalid_upload_is_not_a_dataset_and_can_be_tried_again(api: Api) -> None:
    data = text_csv(sentiment_rows(50), header=("review", "sentiment"))
    upload = start(api, data, checksum=False)
    assert send(api, upload["id"], 0, data[:100]).status_code == 200  # type: ignore[attr-defined]
    early = api.post(f"/v1/uploads/{upload['id']}/dataset", json={"task": "text_classification"})
    assert early.status_code == 409 and "100 of" in early.json()["error"]["message"]
    assert send(api, upload["id"], 100, data[100:]).status_code == 200  # type: ignore[attr-defined]
    wrong = api.post(f"/v1/uploads/{upload['id']}/dataset", json={"task": "text_classification"})
    assert wrong.status_code == 422, wrong.text  # no `text` column: the upload stays
    right = api.post(
        f"/v1/uploads/{upload['id']}/dataset",
        json={"task": "text_classification", "text_column": "review", "label_column": "sentiment"},
    )
    assert right.status_code == 201, right.text
    assert right.json()["num_examples"] == 50


def test_abandoned_uploads_are_removed(settings: Settings) -> None:
    with TestClient(create_app(settings.model_copy(update={"reaper_interval_seconds": 0}))) as client:
        api = new_project(Api(client, ADMIN_KEY))
        data = text_csv(sentiment_rows(20))
        old, fresh = start(api, data), start(api, data)
        assert send(api, old["id"], 0, data[:50]).status_code == 200  # type: ignore[attr-defined]
        engine = make_engine(settings.effective_database_url)
        factory = make_session_factory(engine)
        with session_scope(factory) as session:
            session.execute(
                update(Upload)
                .where(Upload.id == old["id"])
                .values(updated_at=utcnow() - timedelta(seconds=settings.upload_expiry_seconds + 60))
            )
        with session_scope(factory) as session:
            removed = remove_abandoned(session, Storage(settings.storage_dir), settings)
        engine.dispose()
        assert old["id"] in removed and fresh["id"] not in removed
        assert api.get(f"/v1/uploads/{old['id']}").status_code == 404
        assert not (settings.storage_dir / "uploads" / f"{old['id']}.part").exists()
        assert api.get(f"/v1/uploads/{fresh['id']}").status_code == 200
        assert (
            api.http.delete(
                f"/v1/uploads/{fresh['id']}", headers={"Authorization": f"Bearer {api.key}"}
            ).status_code
            == 204
        )
        assert not (settings.storage_dir / "uploads" / f"{fresh['id']}.part").exists()
