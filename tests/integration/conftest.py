"""API tests: the real application in-process (TestClient) on the real database and broker. No worker
consumes the queue used here, so jobs stay queued unless a test moves them on."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from app.core.config import Settings
from app.main import create_app
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
