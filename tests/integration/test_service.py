"""Readiness, the OpenAPI document and the error envelope."""

from __future__ import annotations

from pathlib import Path

from fastapi.testclient import TestClient

from app.main import create_app
from graft.config import Settings


def test_readyz_is_503_when_the_broker_is_down(settings: Settings) -> None:
    broken = settings.model_copy(update={"broker_url": "redis://127.0.0.1:1/0"})
    with TestClient(create_app(broken)) as client:
        response = client.get("/readyz")
    assert response.status_code == 503
    body = response.json()
    assert body["checks"]["database"] == "ok"
    assert body["checks"]["broker"].startswith("unavailable")
    assert response.headers["retry-after"] == "5"


def test_readyz_is_503_when_the_database_is_down(settings: Settings, tmp_path: Path) -> None:
    missing = tmp_path / "no-such-dir" / "graft.db"
    broken = settings.model_copy(update={"database_url": f"sqlite:///{missing}"})
    with TestClient(create_app(broken)) as client:
        response = client.get("/readyz")
        assert response.status_code == 503
        assert response.json()["checks"]["database"].startswith("unavailable")
        assert client.get("/healthz").status_code == 200


def test_openapi_documents_every_route_with_schemas(client: TestClient) -> None:
    assert client.get("/docs").status_code == 200
    spec = client.get("/openapi.json").json()
    paths = spec["paths"]
    expected = {
        ("post", "/v1/datasets"), ("get", "/v1/datasets"), ("get", "/v1/datasets/{dataset_id}"),
        ("get", "/v1/datasets/{dataset_id}/content"), ("delete", "/v1/datasets/{dataset_id}"),
        ("get", "/v1/models"), ("get", "/v1/models/{model_id}"), ("post", "/v1/models/{model_id}/predict"),
        ("post", "/v1/jobs"), ("get", "/v1/jobs"), ("get", "/v1/jobs/{job_id}"), ("post", "/v1/jobs/{job_id}/cancel"),
        ("get", "/v1/jobs/{job_id}/events"), ("get", "/v1/jobs/{job_id}/checkpoints"),
        ("get", "/v1/checkpoints/{checkpoint_id}/content"),
        ("post", "/v1/projects"), ("post", "/v1/projects/{project_id}/api_keys"),
        ("get", "/healthz"), ("get", "/readyz"),
    }  # fmt: skip
    documented = {(method, path) for path, item in paths.items() for method in item}
    assert expected <= documented
    upload = paths["/v1/datasets"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert set(upload["required"]) == {"file", "task"}
    predict = paths["/v1/models/{model_id}/predict"]["post"]["requestBody"]["content"]
    assert {"application/json", "multipart/form-data"} <= set(predict)
    job_body = paths["/v1/jobs"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert set(job_body["discriminator"]["mapping"]) == {"finetune", "pretrain", "adapt", "distill"}
    schemas = spec["components"]["schemas"]
    assert schemas["TrainingJobCreate"]["examples"][0]["base_model"] == "minilm-l6"
    assert schemas["AdaptJobCreate"]["examples"][0]["methods"] == ["dann", "coral"]
    assert schemas["DistillJobCreate"]["examples"][0]["student"]["architecture"] == "minilm-l6"
    report = paths["/v1/jobs/{job_id}/report"]["get"]["responses"]["200"]["content"]["application/json"][
        "schema"
    ]
    assert set(report["discriminator"]["mapping"]) == {"transfer", "adaptation", "distillation"}
    assert "linear_probe" in paths["/v1/jobs"]["post"]["description"]  # the defaults table
    for path, item in paths.items():
        if path.startswith("/v1"):
            for method, operation in item.items():
                assert "401" in operation["responses"], (method, path)
                assert operation["security"], (method, path)


def test_unknown_route_and_method_use_the_error_envelope(client: TestClient) -> None:
    missing = client.get("/v1/nothing-here")
    assert missing.status_code == 404
    assert set(missing.json()["error"]) == {"code", "message", "param"}
    wrong = client.put("/v1/jobs")
    assert wrong.status_code == 405
    assert wrong.json()["error"]["code"] == "method_not_allowed"
