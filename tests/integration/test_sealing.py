"""Projects are sealed from each other, checked over the whole API: every route of the OpenAPI spec that
takes an id is called with the ids of another project's objects, and answers 404 exactly as for a missing
id (admin-only routes: 403 to a project key); nothing of the other project changes. A route added later
with an id this test does not know fails it until it is covered."""

from __future__ import annotations

import re
from typing import Any

from fastapi.testclient import TestClient

from tests.conftest import ADMIN_KEY
from tests.helpers import Api

# What each route is sent: a body where it needs one, so that only the id can make it fail.
BODIES: dict[tuple[str, str], dict[str, Any]] = {
    ("POST", "/v1/models/{model_id}/evaluate"): {"json": {"dataset": "{dataset_id}"}},
    ("POST", "/v1/models/{model_id}/predict"): {"json": {"inputs": [{"sepal_length": 1.0}]}},
    ("POST", "/v1/uploads/{upload_id}/dataset"): {"json": {"task": "tabular_classification"}},
    ("PATCH", "/v1/uploads/{upload_id}"): {
        "content": b"x",
        "headers": {"Content-Type": "application/offset+octet-stream", "Upload-Offset": "0"},
    },
    ("POST", "/v1/projects/{project_id}/api_keys"): {"json": {"name": "stolen"}},
}
ADMIN_ONLY = {"/v1/projects/{project_id}/api_keys", "/v1/projects/{project_id}/api_keys/{key_id}"}


def fill(template: Any, ids: dict[str, str]) -> Any:
    if isinstance(template, str):
        return re.sub(r"\{(\w+)\}", lambda m: ids[m.group(1)], template)
    if isinstance(template, dict):
        return {k: fill(v, ids) for k, v in template.items()}
    if isinstance(template, list):
        return [fill(v, ids) for v in template]
    return template


def test_every_route_answers_404_for_another_projects_ids(
    client: TestClient, iris_model: tuple[Api, str, str], other: Api
) -> None:
    owner, dataset_id, model_id = iris_model
    model = owner.get(f"/v1/models/{model_id}").json()
    job_id = model["job_id"]
    checkpoint_id = owner.get(f"/v1/jobs/{job_id}/checkpoints").json()["data"][0]["id"]
    upload_id = owner.post("/v1/uploads", json={"filename": "x.csv", "size": 10}).json()["id"]
    keys = Api(client, ADMIN_KEY).get(f"/v1/projects/{owner.project_id}/api_keys")
    key_id = keys.json()["data"][0]["id"]
    ids = {
        "dataset_id": dataset_id,
        "model_id": model_id,
        "job_id": job_id,
        "checkpoint_id": checkpoint_id,
        "upload_id": upload_id,
        "project_id": owner.project_id or "",
        "key_id": key_id,
    }
    before = {path: owner.get(path).json() for path in (f"/v1/datasets/{dataset_id}", f"/v1/jobs/{job_id}")}

    spec = client.get("/openapi.json").json()
    called = 0
    for path, operations in spec["paths"].items():
        names = re.findall(r"\{(\w+)\}", path)
        if not names:
            continue
        assert set(names) <= set(ids), f"{path}: add its ids to this test"
        for method in operations:
            method = method.upper()
            options = fill(BODIES.get((method, path), {}), ids)
            headers = {"Authorization": f"Bearer {other.key}", **options.pop("headers", {})}
            response = client.request(method, fill(path, ids), headers=headers, **options)
            expected = 403 if path in ADMIN_ONLY else 404
            assert response.status_code == expected, (
                f"{method} {path}: {response.status_code} {response.text}"
            )
            if expected == 404:
                # Indistinguishable from an id that does not exist.
                missing = client.request(
                    method,
                    fill(path, {k: v[: v.index("_") + 1] + "missing" for k, v in ids.items()}),
                    headers=headers,
                    **options,
                )
                assert missing.status_code == 404
                assert response.json()["error"]["code"] == missing.json()["error"]["code"]
            called += 1
    assert called >= 20

    # Ids in request bodies are sealed too.
    job = other.create_job({"base_model": model_id, "training_dataset": dataset_id})
    assert job.status_code == 404, job.text
    ranked = other.post("/v1/transferability", json={"dataset": dataset_id, "models": ["mlp"]})
    assert ranked.status_code == 404, ranked.text
    resumed = other.create_job({"from_checkpoint": checkpoint_id, "training_dataset": dataset_id})
    assert resumed.status_code == 404, resumed.text

    # Nothing of the owner's changed, nothing was added to the other project.
    for path, value in before.items():
        assert owner.get(path).json() == value
    assert owner.get(f"/v1/uploads/{upload_id}").status_code == 200
    assert other.get("/v1/datasets").json()["data"] == [] and other.get("/v1/jobs").json()["data"] == []
