"""Rate limits per API key and CORS, on the session's backend (the limit's counts live in Redis when the
broker is Redis, in memory otherwise)."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from graft.config import Settings
from tests.conftest import ADMIN_KEY
from tests.helpers import Api, new_project

LIMIT = 5


@pytest.fixture
def limited(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings.model_copy(update={"rate_limit_per_minute": LIMIT}))) as client:
        yield client


def test_a_key_over_its_rate_limit_gets_429_with_retry_after(limited: TestClient) -> None:
    if time.time() % 60 > 50:  # stay inside one minute's window
        time.sleep(61 - time.time() % 60)
    one = new_project(Api(limited, ADMIN_KEY))
    two = new_project(Api(limited, ADMIN_KEY))
    statuses = [one.get("/v1/datasets").status_code for _ in range(LIMIT)]
    assert statuses == [200] * LIMIT
    refused = one.get("/v1/datasets")
    assert refused.status_code == 429, refused.text
    assert refused.json()["error"]["code"] == "rate_limited"
    assert 1 <= int(refused.headers["Retry-After"]) <= 60
    # Other keys have their own budget; health checks have none.
    assert two.get("/v1/datasets").status_code == 200
    assert limited.get("/healthz").status_code == 200


def test_cors_is_off_unless_origins_are_configured(client: TestClient, settings: Settings) -> None:
    preflight = {
        "Origin": "https://evil.example",
        "Access-Control-Request-Method": "GET",
        "Access-Control-Request-Headers": "Authorization",
    }
    answer = client.options("/v1/datasets", headers=preflight)
    assert "access-control-allow-origin" not in answer.headers
    got = client.get(
        "/v1/datasets", headers={"Origin": "https://evil.example", "Authorization": f"Bearer {ADMIN_KEY}"}
    )
    assert "access-control-allow-origin" not in got.headers

    configured = settings.model_copy(update={"cors_origins": "https://app.example"})
    with TestClient(create_app(configured)) as browser:
        allowed = browser.options("/v1/datasets", headers={**preflight, "Origin": "https://app.example"})
        assert allowed.headers["access-control-allow-origin"] == "https://app.example"
        other = browser.options("/v1/datasets", headers=preflight)
        assert "access-control-allow-origin" not in other.headers
