"""The request path, hardened (what an outside attack on `make run` found): keys checked before any body is
read, reads that never wait for SQLite's write lock, keys of project admins that stay inside their project,
room checked before an upload is accepted, bounded predictions, evaluations that become jobs when they
would take long, and a 400 for a multipart boundary the parser cannot take."""

from __future__ import annotations

import json
import shutil
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from PIL import Image
from safetensors.torch import save

from app.main import create_app
from graft.config import Settings
from graft.spec import ModelSpec
from ml.networks import build_model
from tests.conftest import ADMIN_KEY, Backend, make_settings
from tests.helpers import Api, iris_csv, new_project, png_bytes, sentiment_rows, text_csv

# ------------------------------------------------------------------------------------------- helpers


def weights_of(spec: ModelSpec) -> bytes:
    return save({k: v.contiguous() for k, v in build_model(spec, pretrained=False).state_dict().items()})


def import_model(api: Api, spec: ModelSpec, config: dict[str, Any]) -> str:
    response = api.post(
        "/v1/models",
        files={"weights": ("model.safetensors", weights_of(spec))},
        data={"config": json.dumps(config)},
    )
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


@pytest.fixture
def embedded(tmp_path: Path) -> Iterator[tuple[TestClient, Settings]]:
    """The embedded default (SQLite) whatever the session's backend: what `make run` serves."""
    settings = make_settings(Backend("embedded", None, None), tmp_path / "home")
    from app.cli import prestart

    prestart(settings)
    with TestClient(create_app(settings)) as client:
        yield client, settings


# ------------------------------------------------------------------------------ authentication first


def test_a_request_without_a_valid_key_is_refused_before_its_body_is_read(client: TestClient) -> None:
    pulled = []

    def body() -> Iterator[bytes]:
        for _ in range(60):
            pulled.append(1)
            yield b"x" * (1024 * 1024)

    for headers in ({}, {"Authorization": "Bearer graft_not_a_real_key"}):
        pulled.clear()
        response = client.post(
            "/v1/jobs", content=body(), headers={"Content-Type": "application/json", **headers}
        )
        assert response.status_code == 401, response.text
        assert response.json()["error"]["code"] == "unauthorized"
        assert pulled == [], "the body was read before the key was checked"


def test_a_revoked_key_stops_working_at_once_though_keys_are_cached(admin: Api) -> None:
    member = new_project(admin, "revoke-cache")
    assert member.get("/v1/jobs").status_code == 200  # now cached
    key_id = admin.get(f"/v1/projects/{member.project_id}/api_keys").json()["data"][0]["id"]
    assert admin.delete(f"/v1/projects/{member.project_id}/api_keys/{key_id}").status_code == 200
    refused = member.get("/v1/jobs")
    assert refused.status_code == 401
    assert "revoked" in refused.json()["error"]["message"]


# ------------------------------------------------------------------------- operator and project admins


def oldest_project(operator: Api) -> str:
    """The default project (the first one made), paging through the newest-first list."""
    page = operator.get("/v1/projects?limit=100").json()
    while page["has_more"]:
        page = operator.get(f"/v1/projects?limit=100&after={page['data'][-1]['id']}").json()
    return str(page["data"][-1]["id"])


def _project_admin(operator: Api, name: str) -> Api:
    project = operator.post("/v1/projects", json={"name": name}).json()
    key = operator.post(f"/v1/projects/{project['id']}/api_keys", json={"name": "boss", "role": "admin"})
    assert key.status_code == 201, key.text
    return Api(operator.http, key.json()["key"], project["id"])


def test_a_project_admin_manages_its_own_project_and_nothing_else(admin: Api) -> None:
    operator = admin  # the bootstrap key
    a = _project_admin(operator, "project-a")
    b = _project_admin(operator, "project-b")
    dataset = a.upload_ok(iris_csv(), "iris.csv", "tabular_classification", label_column="species")
    a_keys = operator.get(f"/v1/projects/{a.project_id}/api_keys").json()["data"]

    # B's admin sees B only, creates no project, and A's keys and data are as if they did not exist.
    listed = b.get("/v1/projects").json()["data"]
    assert [p["id"] for p in listed] == [b.project_id]
    assert b.post("/v1/projects", json={"name": "mine"}).status_code == 403
    assert b.get(f"/v1/projects/{a.project_id}").status_code == 404
    assert b.post(f"/v1/projects/{a.project_id}/api_keys", json={"role": "admin"}).status_code == 404
    assert b.get(f"/v1/projects/{a.project_id}/api_keys").status_code == 404
    assert b.delete(f"/v1/projects/{a.project_id}/api_keys/{a_keys[0]['id']}").status_code == 404
    assert b.get(f"/v1/datasets/{dataset['id']}").status_code == 404
    assert a.get(f"/v1/datasets/{dataset['id']}").status_code == 200  # A's admin key still works

    # Within B: members and admins yes, operator keys no.
    member = b.post(f"/v1/projects/{b.project_id}/api_keys", json={"name": "ci"})
    assert member.status_code == 201 and member.json()["role"] == "member"
    assert b.post(f"/v1/projects/{b.project_id}/api_keys", json={"role": "operator"}).status_code == 403

    # Key listings show a short prefix, never the key or what it is found by.
    for row in b.get(f"/v1/projects/{b.project_id}/api_keys").json()["data"]:
        assert set(row) == {
            "object",
            "id",
            "project_id",
            "name",
            "role",
            "prefix",
            "created_at",
            "revoked_at",
        }
        assert len(row["prefix"]) == 10 and row["prefix"].startswith("graft_")

    # The operator's key (in the default project) cannot be revoked by that project's own admins.
    default = oldest_project(operator)
    keys = operator.get(f"/v1/projects/{default}/api_keys?limit=100").json()["data"]
    operator_key = next(k for k in keys if k["role"] == "operator")
    default_admin = operator.post(f"/v1/projects/{default}/api_keys", json={"role": "admin"}).json()["key"]
    revoke = Api(operator.http, default_admin).delete(f"/v1/projects/{default}/api_keys/{operator_key['id']}")
    assert revoke.status_code == 403
    assert operator.get("/v1/projects").status_code == 200


def test_a_revoked_operator_key_is_not_presented_as_valid_at_the_next_start(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from app.cli import bootstrap, new_operator_key, prestart

    settings = make_settings(Backend("embedded", None, None), tmp_path / "home", bootstrap_api_key=None)
    key = prestart(settings)
    assert key is not None and settings.admin_key_file.read_text().strip() == key
    with TestClient(create_app(settings)) as client:
        operator = Api(client, key)
        default = oldest_project(operator)
        row = next(
            k
            for k in operator.get(f"/v1/projects/{default}/api_keys").json()["data"]
            if k["role"] == "operator"
        )
        assert operator.delete(f"/v1/projects/{default}/api_keys/{row['id']}").status_code == 200
        assert operator.get("/v1/projects").status_code == 401
    capsys.readouterr()
    status = bootstrap(settings)
    assert status.revoked and prestart(settings) is None
    assert "was revoked" in capsys.readouterr().out
    fresh = new_operator_key(settings)
    assert fresh != key and settings.admin_key_file.read_text().strip() == fresh
    assert not bootstrap(settings).revoked
    with TestClient(create_app(settings)) as client:
        assert Api(client, fresh).get("/v1/projects").status_code == 200


# ---------------------------------------------------------------------- SQLite: reads take no lock


def test_reads_do_not_wait_for_sqlites_write_lock(embedded: tuple[TestClient, Settings]) -> None:
    client, settings = embedded
    api = new_project(Api(client, ADMIN_KEY))
    dataset = api.upload_ok(iris_csv(), "iris.csv", "tabular_classification", label_column="species")
    job = api.create_job({"base_model": "mlp", "training_dataset": dataset["id"]}).json()
    # Another process (a worker writing progress, say) holds the write lock meanwhile.
    holder = sqlite3.connect(
        settings.home / "graft.db", timeout=1, isolation_level=None, check_same_thread=False
    )
    holder.execute("BEGIN IMMEDIATE")
    try:
        started = time.perf_counter()
        for url in (
            f"/v1/jobs/{job['id']}",
            "/v1/jobs",
            f"/v1/jobs/{job['id']}/events",
            f"/v1/datasets/{dataset['id']}",
            "/v1/datasets",
            "/v1/models",
            f"/v1/jobs/{job['id']}/checkpoints",
        ):
            response = api.get(url)
            assert response.status_code == 200, (url, response.text)
        assert time.perf_counter() - started < 10  # the write lock's busy timeout is 30 s

        # A write waits for the lock and goes through once it is free.
        def release() -> None:
            time.sleep(1)
            holder.execute("COMMIT")

        threading.Thread(target=release).start()
        cancelled = api.post(f"/v1/jobs/{job['id']}/cancel")
        assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    finally:
        if holder.in_transaction:
            holder.execute("ROLLBACK")
        holder.close()


# ------------------------------------------------------------------------------------------ storage


@pytest.fixture
def roomy(settings: Settings) -> Iterator[tuple[Api, Settings]]:
    """Uploads may declare anything; only the room on the volume limits them."""
    changed = settings.model_copy(update={"max_upload_bytes": 2**62})
    with TestClient(create_app(changed)) as client:
        yield new_project(Api(client, ADMIN_KEY)), changed


def test_declared_uploads_must_fit_in_the_free_space_together(roomy: tuple[Api, Settings]) -> None:
    api, settings = roomy
    other = new_project(Api(api.http, ADMIN_KEY))
    usage = shutil.disk_usage(settings.storage_dir)
    available = usage.free - min(settings.min_free_bytes, usage.total // 20)
    margin = 64 * 1024 * 1024  # what other tests may write meanwhile
    too_big = api.post("/v1/uploads", json={"filename": "huge.csv", "size": usage.free + 1})
    assert too_big.status_code == 507, too_big.text
    assert too_big.json()["error"]["param"] == "size"
    # One project holds at most half of the room with uploads it has not sent.
    first = api.post("/v1/uploads", json={"filename": "a.csv", "size": available // 2 - margin})
    assert first.status_code == 201, first.text
    more = api.post("/v1/uploads", json={"filename": "b.csv", "size": 2 * margin})
    assert more.status_code == 507 and more.json()["error"]["code"] == "storage_reservation_exceeded"
    # Another project still has room: half of what is left beside the first one's.
    theirs = other.post("/v1/uploads", json={"filename": "c.csv", "size": available // 4 - margin})
    assert theirs.status_code == 201, theirs.text
    beyond = other.post("/v1/uploads", json={"filename": "d.csv", "size": available // 4 + margin})
    assert beyond.status_code == 507, beyond.text
    # Room comes back when an upload is abandoned.
    assert api.delete(f"/v1/uploads/{first.json()['id']}").status_code == 204
    again = other.post("/v1/uploads", json={"filename": "d.csv", "size": available // 4})
    assert again.status_code == 201, again.text
    for upload in (theirs, again):
        other.delete(f"/v1/uploads/{upload.json()['id']}")


def test_a_projects_storage_share_is_enforced(settings: Settings) -> None:
    csv = text_csv(sentiment_rows(2000))
    share = int(len(csv) * 1.5)
    with TestClient(create_app(settings.model_copy(update={"project_storage_bytes": share}))) as client:
        api = new_project(Api(client, ADMIN_KEY))
        api.upload_ok(csv, "first.csv", "text_classification")
        second = api.upload(csv, "second.csv", "text_classification")
        assert second.status_code == 413, second.text
        assert second.json()["error"]["code"] == "storage_quota_exceeded"
        declared = api.post("/v1/uploads", json={"filename": "r.csv", "size": len(csv)})
        assert declared.status_code == 413 and declared.json()["error"]["param"] == "size"
        other = new_project(Api(client, ADMIN_KEY))  # a share per project
        other.upload_ok(csv, "first.csv", "text_classification")


# ------------------------------------------------------------------------------- multipart boundary


def test_an_overlong_multipart_boundary_is_a_400_on_every_multipart_route(api: Api) -> None:
    boundary = "B" * 300
    headers = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
    model_id = import_model(
        api,
        ModelSpec.for_builtin("cnn-small").with_classes(["a", "b"]),
        {"architecture": "cnn-small", "classes": ["a", "b"]},
    )
    for url in ("/v1/datasets", "/v1/models", f"/v1/models/{model_id}/predict"):
        response = api.post(url, content=b"x", headers=headers)
        assert response.status_code == 400, (url, response.text)
        assert "boundary" in response.json()["error"]["message"]


# ------------------------------------------------------------------------------------- predictions


def test_predictions_give_the_top_k_classes_most_probable_first(api: Api) -> None:
    classes = [f"class-{i}" for i in range(8)]
    spec = ModelSpec.for_builtin("mlp").with_classes(classes)
    spec = spec.model_copy(
        update={
            "options": {"in_features": 2, "hidden": [16]},
            "input_spec": {**spec.input_spec, "feature_columns": ["a", "b"]},
        }
    )
    model_id = import_model(
        api, spec, {"architecture": "mlp", "classes": classes, "feature_columns": ["a", "b"], "hidden": [16]}
    )
    rows = {"inputs": [{"a": 0.5, "b": -1.0}, {"a": 3.0, "b": 2.0}]}
    default = api.post(f"/v1/models/{model_id}/predict", json=rows).json()["predictions"]
    three = api.post(f"/v1/models/{model_id}/predict?top_k=3", json=rows).json()["predictions"]
    for prediction in default:
        values = list(prediction["probabilities"].values())
        assert len(values) == 5 and values == sorted(values, reverse=True)
        assert prediction["label"] == next(iter(prediction["probabilities"]))
    for full, short in zip(default, three, strict=True):
        assert list(short["probabilities"].items()) == list(full["probabilities"].items())[:3]
    every = api.post(f"/v1/models/{model_id}/predict?top_k=100", json=rows).json()["predictions"][0]
    assert sorted(every["probabilities"]) == classes and sum(
        every["probabilities"].values()
    ) == pytest.approx(1, abs=1e-4)
    assert api.post(f"/v1/models/{model_id}/predict?top_k=0", json=rows).status_code == 422


def test_prediction_requests_are_bounded_before_anything_is_decoded(settings: Settings) -> None:
    changed = settings.model_copy(update={"max_predict_pixels": 500_000, "max_json_bytes": 200_000})
    with TestClient(create_app(changed)) as client:
        api = new_project(Api(client, ADMIN_KEY))
        model_id = import_model(
            api,
            ModelSpec.for_builtin("cnn-small").with_classes(["a", "b"]),
            {"architecture": "cnn-small", "classes": ["a", "b"]},
        )
        small = png_bytes(Image.new("RGB", (100, 100), "white"))
        fine = api.post(f"/v1/models/{model_id}/predict", files=[("files", ("a.png", small))] * 3)
        assert fine.status_code == 200, fine.text
        big = png_bytes(Image.new("RGB", (600, 600), "white"))  # 360,000 pixels each, a few KB compressed
        refused = api.post(f"/v1/models/{model_id}/predict", files=[("files", ("b.png", big))] * 2)
        assert refused.status_code == 422, refused.text
        assert refused.json()["error"]["code"] == "input_too_large"
        assert "files[1]" in refused.json()["error"]["message"]
        oversized = api.post(
            f"/v1/models/{model_id}/predict",
            content=json.dumps({"inputs": ["x" * 300_000]}),
            headers={"Content-Type": "application/json"},
        )
        assert oversized.status_code == 413


def test_text_inputs_are_bounded_per_input_and_per_request() -> None:
    from app.core.errors import Unprocessable
    from app.models.serving import ModelServer, ServingLimits
    from graft.formats import ArchiveLimits

    server = ModelServer(
        None,  # type: ignore[arg-type]  (no model is loaded to check bounds)
        1,
        ArchiveLimits(),
        ServingLimits(max_text_chars=1000, max_predict_chars=2500, max_predict_pixels=10),
    )
    server.check_inputs("text", ["a" * 1000, "b" * 1000])
    with pytest.raises(Unprocessable, match=r"inputs\[1\]: 1001 characters"):
        server.check_inputs("text", ["a", "b" * 1001])
    with pytest.raises(Unprocessable, match="3000 characters of text in one request"):
        server.check_inputs("text", ["a" * 1000] * 3)
    huge = png_bytes(
        Image.new("L", (6300, 6300))
    )  # decoding this would take a while: only the header is read
    started = time.perf_counter()
    with pytest.raises(Unprocessable, match="pixels in all"):
        server.check_inputs("image", [("huge.png", huge)])
    assert time.perf_counter() - started < 1.0


# -------------------------------------------------------------------------------------- evaluation


def test_an_evaluation_that_would_take_long_becomes_a_job_at_once(
    iris_model: tuple[Api, str, str], settings: Settings
) -> None:
    api, dataset_id, model_id = iris_model
    assert api.post(f"/v1/models/{model_id}/evaluate", json={"dataset": dataset_id}).status_code == 200
    # The same evaluation where a few seconds are less than it would take: a job, answered at once.
    with TestClient(create_app(settings.model_copy(update={"evaluate_sync_seconds": 0.0}))) as client:
        started = time.perf_counter()
        queued = Api(client, api.key).post(f"/v1/models/{model_id}/evaluate", json={"dataset": dataset_id})
        assert queued.status_code == 202, queued.text
        assert queued.json()["type"] == "evaluate"
        assert time.perf_counter() - started < 5


def test_the_cost_model_learns_from_what_it_serves() -> None:
    from app.models.serving import PRIOR_SECONDS_PER_EXAMPLE, CostModel

    costs = CostModel()
    assert costs.per_example("minilm-l6") == PRIOR_SECONDS_PER_EXAMPLE["minilm-l6"]
    costs.observe("minilm-l6", 100, 0.2)
    assert costs.per_example("minilm-l6") == pytest.approx(0.002)
    costs.observe("minilm-l6", 100, 1.2)
    assert 0.002 < costs.per_example("minilm-l6") < 0.012


# ---------------------------------------------------------------------------------------- downloads


def test_dataset_files_are_served_as_attachments_byte_for_byte(api: Api) -> None:
    data = b'text,label\n=HYPERLINK("http://example.com"),a\n+1,b\n-2,a\n@SUM(A1),b\n'
    dataset = api.upload_ok(data, "formulas.csv", "text_classification")
    response = api.get(f"/v1/datasets/{dataset['id']}/content")
    assert response.content == data
    assert response.headers["content-disposition"].startswith("attachment")
    assert response.headers["x-content-type-options"] == "nosniff"


# ---------------------------------------------------------------- found by the second outside attack


def test_every_body_but_multipart_has_the_json_cap(settings: Settings) -> None:
    with TestClient(create_app(settings.model_copy(update={"max_json_bytes": 100_000}))) as client:
        api = new_project(Api(client, ADMIN_KEY))
        body = b'{"type": "finetune", "x": "' + b"y" * 200_000 + b'"}'
        for content_type in ("application/json", "application/x+json", "text/plain", None):
            headers = {"Content-Type": content_type} if content_type else {}
            chunks = iter([body[i : i + 10_000] for i in range(0, len(body), 10_000)])
            streamed = api.post("/v1/jobs", content=chunks, headers=headers)  # no Content-Length
            assert streamed.status_code == 413, (content_type, streamed.text[:200])


def test_errors_never_echo_a_huge_input(api: Api) -> None:
    response = api.post("/v1/jobs", json={"type": "t" * 1_000_000})
    assert response.status_code == 422
    assert len(response.content) < 3000
    assert response.json()["error"]["param"] == "type"


def test_messages_say_what_is_wrong(api: Api) -> None:
    not_utf8 = api.get("/v1/datasets?after=%FF")
    assert not_utf8.status_code == 400 and "not UTF-8" in not_utf8.json()["error"]["message"]
    upload = api.post("/v1/uploads", json={"filename": "r.csv", "size": 10}).json()
    bad_offset = api.http.patch(
        f"/v1/uploads/{upload['id']}",
        content=b"1",
        headers={
            "Authorization": f"Bearer {api.key}",
            "Content-Type": "application/offset+octet-stream",
            "Upload-Offset": "abc",
        },
    )
    assert bad_offset.status_code == 400 and "whole number" in bad_offset.json()["error"]["message"]
    empty = api.post("/v1/models/mdl_x/evaluate", json={"dataset": ""})
    assert empty.status_code == 422 and empty.json()["error"]["param"] == "dataset"


def test_an_import_config_may_hold_as_many_classes_as_the_limits_allow(api: Api) -> None:
    classes = [f"{i:04d}" + "y" * 196 for i in range(1000)]  # 1000 classes of 200 characters: ~200 KB
    spec = ModelSpec.for_builtin("mlp").with_classes(classes)
    spec = spec.model_copy(
        update={
            "options": {"in_features": 2, "hidden": [8]},
            "input_spec": {**spec.input_spec, "feature_columns": ["a", "b"]},
        }
    )
    import_model(
        api, spec, {"architecture": "mlp", "classes": classes, "feature_columns": ["a", "b"], "hidden": [8]}
    )


def test_the_model_cache_is_bounded_by_weight(tmp_path: Path) -> None:
    from app.models.serving import ModelServer
    from graft.formats import ArchiveLimits
    from graft.storage import Storage
    from graft.tables import Model
    from ml.weights import save_weights

    storage = Storage(tmp_path)
    (tmp_path / "models").mkdir()
    rows = []
    for i in range(3):
        spec = ModelSpec.for_builtin("cnn-small").with_classes(["a", "b"])
        key = f"models/m{i}.safetensors"
        save_weights(storage.path(key), build_model(spec, pretrained=False).state_dict(), spec)
        rows.append(
            Model(
                id=f"mdl_{i}",
                architecture="cnn-small",
                spec=spec.model_dump(),
                weights_path=key,
                weights_sha256=str(i),
            )
        )
    one = sum(t.numel() * t.element_size() for t in build_model(spec, pretrained=False).state_dict().values())
    server = ModelServer(storage, capacity=10, limits=ArchiveLimits(), max_bytes=int(one * 2.5))
    image = png_bytes(Image.new("RGB", (8, 8)))
    for row in rows:
        server.predict(row, [("a.png", image)])
    assert [server.is_loaded(row) for row in rows] == [False, True, True]  # the oldest went, by weight


def test_cost_estimates_count_the_pixels_of_a_datasets_images(settings: Settings) -> None:
    from tests.helpers import image_zip

    changed = settings.model_copy(update={"evaluate_sync_seconds": 2.0, "rank_sync_seconds": 2.0})
    with TestClient(create_app(changed)) as client:
        api = new_project(Api(client, ADMIN_KEY))
        model_id = import_model(
            api,
            ModelSpec.for_builtin("cnn-small").with_classes(["a", "b"]),
            {"architecture": "cnn-small", "classes": ["a", "b"]},
        )

        def dataset(size: int) -> str:
            images = [
                (label, Image.new("L", (size, size), 40 + 150 * i)) for i, label in enumerate("ab" * 20)
            ]
            return str(api.upload_ok(image_zip(images), f"d{size}.zip", "image_classification")["id"])

        small, huge = dataset(32), dataset(1500)  # 40 images each; 90 M pixels in the second
        assert api.get(f"/v1/datasets/{huge}").json()["pixels"] == 40 * 1500 * 1500
        assert api.post(f"/v1/models/{model_id}/evaluate", json={"dataset": small}).status_code == 200
        queued = api.post(f"/v1/models/{model_id}/evaluate", json={"dataset": huge})
        assert queued.status_code == 202, "40 images of 1500x1500 take longer to decode than a request may"
        refused = api.post(
            "/v1/transferability", json={"dataset": huge, "models": ["cnn-small", "efficientnet-lite0"]}
        )
        assert refused.status_code == 422 and refused.json()["error"]["code"] == "too_costly"
        assert "max_examples" in refused.json()["error"]["message"]
