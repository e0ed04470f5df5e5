"""API tests: the real application in-process (TestClient) on the real database and broker. No worker
consumes the queue used here, so jobs stay queued unless a test moves them on."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from app.main import create_app
from graft.config import Settings
from tests.conftest import ADMIN_KEY
from tests.helpers import Api, new_project


@pytest.fixture(scope="session")
def app(settings: Settings) -> FastAPI:
    return create_app(settings)


@pytest.fixture(scope="session")
def client(app: FastAPI) -> Iterator[TestClient]:
    with TestClient(app) as test_client:
        yield test_client


@pytest.fixture
def admin(client: TestClient) -> Api:
    return Api(client, ADMIN_KEY)


@pytest.fixture
def api(admin: Api) -> Api:
    return new_project(admin)


@pytest.fixture
def other(admin: Api) -> Api:
    """A second project, for isolation checks."""
    return new_project(admin, "other")


def run_in_process(settings: Settings, job_id: str) -> None:
    """Run a queued job with the real runner in this process (no worker consumes the API tests' queue)."""
    from graft.db import make_engine, make_session_factory
    from graft.storage import Storage
    from workers.runner import WorkerContext, execute_job

    engine = make_engine(settings.effective_database_url)
    try:
        execute_job(
            job_id,
            WorkerContext(settings, engine, make_session_factory(engine), Storage(settings.storage_dir)),
        )
    finally:
        engine.dispose()


def succeeded(api: Api, settings: Settings, body: dict[str, Any]) -> dict[str, Any]:
    """Create a job, run it with the real runner, and return it once it has succeeded."""
    response = api.create_job(body)
    assert response.status_code == 201, response.text
    run_in_process(settings, response.json()["id"])
    job = api.get(f"/v1/jobs/{response.json()['id']}").json()
    assert job["status"] == "succeeded", job["error"]
    return job


@pytest.fixture(scope="session")
def iris_model(client: TestClient, settings: Settings) -> tuple[Api, str, str]:
    """A project with an iris dataset and an mlp trained on it: (api, dataset id, model id)."""
    from tests.helpers import iris_csv

    api = new_project(Api(client, ADMIN_KEY))
    dataset = api.upload_ok(iris_csv(), "iris.csv", "tabular_classification", label_column="species")
    job = api.create_job(
        {"base_model": "mlp", "training_dataset": dataset["id"], "hyperparameters": {"epochs": 25}}
    ).json()
    run_in_process(settings, job["id"])
    job = api.get(f"/v1/jobs/{job['id']}").json()
    assert job["status"] == "succeeded", job["error"]
    return api, dataset["id"], job["result_model"]
