"""API keys and projects: who may call what, and projects sealed from each other."""

from __future__ import annotations

from fastapi.testclient import TestClient
from sqlalchemy import create_engine, select

from graft.config import Settings
from graft.tables import ApiKey
from tests.conftest import ADMIN_KEY
from tests.helpers import Api, iris_csv, new_project


def test_every_v1_route_needs_a_key(client: TestClient) -> None:
    for method, url in [
        ("GET", "/v1/datasets"),
        ("GET", "/v1/models"),
        ("GET", "/v1/jobs"),
        ("POST", "/v1/jobs"),
        ("GET", "/v1/projects"),
    ]:
        response = client.request(method, url)
        assert response.status_code == 401, (method, url)
        assert response.headers["www-authenticate"] == "Bearer"
        assert response.json()["error"]["code"] == "unauthorized"
    unknown = client.get("/v1/datasets", headers={"Authorization": "Bearer graft_not_a_real_key"})
    assert unknown.status_code == 401
    assert "Unknown" in unknown.json()["error"]["message"]


def test_health_needs_no_key(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200, ready.text
    assert ready.json()["checks"] == {"database": "ok", "broker": "ok"}


def test_keys_are_stored_hashed(admin: Api, settings: Settings) -> None:
    project = admin.post("/v1/projects", json={"name": "hashing"}).json()
    created = admin.post(f"/v1/projects/{project['id']}/api_keys", json={"name": "ci"}).json()
    key = created["key"]
    assert key.startswith("graft_") and len(key) > 40
    assert created["prefix"] == key[: len(created["prefix"])]
    engine = create_engine(settings.effective_database_url)
    with engine.connect() as connection:
        row = connection.execute(select(ApiKey).where(ApiKey.id == created["id"])).one()
    engine.dispose()
    stored = " ".join(str(value) for value in row)
    assert key not in stored
    assert key[len(created["prefix"]) :] not in stored


def test_admin_creates_projects_and_keys_members_cannot(admin: Api) -> None:
    member = new_project(admin, "member-project")
    assert member.post("/v1/projects", json={"name": "nope"}).status_code == 403
    forbidden = member.post(f"/v1/projects/{member.project_id}/api_keys", json={})
    assert forbidden.status_code == 403
    assert forbidden.json()["error"]["code"] == "forbidden"
    # A member sees its own project and no other.
    listed = member.get("/v1/projects").json()
    assert [p["id"] for p in listed["data"]] == [member.project_id]
    other = admin.post("/v1/projects", json={"name": "elsewhere"}).json()
    assert member.get(f"/v1/projects/{other['id']}").status_code == 404
    assert admin.get(f"/v1/projects/{other['id']}").json()["name"] == "elsewhere"


def test_revoked_key_is_refused(admin: Api) -> None:
    project = admin.post("/v1/projects", json={"name": "revoke"}).json()
    created = admin.post(f"/v1/projects/{project['id']}/api_keys", json={}).json()
    member = Api(admin.http, created["key"])
    assert member.get("/v1/datasets").status_code == 200
    revoked = admin.delete(f"/v1/projects/{project['id']}/api_keys/{created['id']}")
    assert revoked.status_code == 200 and revoked.json()["revoked_at"] is not None
    assert member.get("/v1/datasets").status_code == 401
    listed = admin.get(f"/v1/projects/{project['id']}/api_keys").json()["data"]
    assert [k["id"] for k in listed] == [created["id"]]
    assert "key" not in listed[0]


def test_objects_of_another_project_answer_404_like_missing_ones(api: Api, other: Api) -> None:
    dataset = api.upload_ok(iris_csv(30), "iris.csv", "tabular_classification", label_column="species")
    job = api.create_job({"base_model": "mlp", "training_dataset": dataset["id"]})
    assert job.status_code == 201, job.text
    job_id = job.json()["id"]
    for url in [
        f"/v1/datasets/{dataset['id']}",
        f"/v1/datasets/{dataset['id']}/content",
        f"/v1/jobs/{job_id}",
        f"/v1/jobs/{job_id}/events",
        f"/v1/jobs/{job_id}/checkpoints",
    ]:
        mine, theirs, missing = (
            api.get(url),
            other.get(url),
            other.get(url.replace(dataset["id"], "ds_missing").replace(job_id, "job_missing")),
        )
        assert mine.status_code == 200, url
        assert theirs.status_code == 404, url
        assert theirs.json()["error"]["code"] == missing.json()["error"]["code"]
    assert other.delete(f"/v1/datasets/{dataset['id']}").status_code == 404
    assert other.post(f"/v1/jobs/{job_id}/cancel").status_code == 404
    stolen = other.create_job({"base_model": "mlp", "training_dataset": dataset["id"]})
    assert stolen.status_code == 404
    assert stolen.json()["error"]["param"] == "training_dataset"
    assert other.get("/v1/jobs").json()["data"] == []
    assert other.get("/v1/datasets").json()["data"] == []


def test_admin_key_from_environment_is_the_default_projects(client: TestClient) -> None:
    admin = Api(client, ADMIN_KEY)
    names: list[str] = []
    after = ""
    while True:
        page = admin.get(f"/v1/projects?limit=100{after}").json()
        names += [p["name"] for p in page["data"]]
        if not page["has_more"]:
            break
        after = f"&after={page['data'][-1]['id']}"
    assert names[-1] == "default"  # newest first: the bootstrap project is the oldest
