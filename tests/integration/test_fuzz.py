"""Fuzzing the whole API from its OpenAPI spec with schemathesis, in process (no worker consumes this
queue, so fuzzed jobs stay queued): for a bounded number of generated requests per operation, including
invalid ones, no 5xx and every response matches its documented schema."""

from __future__ import annotations

import json
import re
from typing import Any

import schemathesis
from hypothesis import HealthCheck, Phase, given
from hypothesis import settings as hypothesis_settings
from schemathesis.checks import not_a_server_error, response_schema_conformance

from app.main import create_app
from graft.config import Settings
from tests.conftest import ADMIN_KEY

EXAMPLES_PER_OPERATION = 25


@schemathesis.serializer("application/offset+octet-stream")
def upload_chunk(ctx: Any, value: Any) -> dict[str, Any]:
    """Upload chunks are raw bytes, sent as such."""
    from schemathesis.transport.serialization import serialize_binary

    return {"data": serialize_binary(value)}


def test_no_server_errors_and_responses_match_their_schemas(settings: Settings) -> None:
    app = create_app(settings.model_copy(update={"reaper_interval_seconds": 0}))
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    failures: list[str] = []
    operations = 0
    for result in schema.get_all_operations():
        operation = result.ok()
        operations += 1

        @given(case=operation.as_strategy())
        @hypothesis_settings(
            max_examples=EXAMPLES_PER_OPERATION,
            deadline=None,
            derandomize=True,
            database=None,
            phases=[Phase.explicit, Phase.generate],
            suppress_health_check=list(HealthCheck),
        )
        def fuzz(case: Any) -> None:
            case.call_and_validate(
                headers={"Authorization": f"Bearer {ADMIN_KEY}"},
                checks=[not_a_server_error, response_schema_conformance],
            )

        try:
            fuzz()
        except Exception as exc:  # every operation is fuzzed; all failures are reported together
            failures.append(f"{operation.label}: {str(exc)[:1500]}")
    assert operations >= 30
    assert not failures, "\n\n".join(failures)


HUGE = "w" * 2_000_000  # a 2 MB string: more than any field, any text input, any class name may hold


def _hostile_bodies() -> list[tuple[str, dict[str, str], bytes]]:
    """(what, headers, body) sent to every operation that takes a body."""
    many_classes = "text,label\n" + "".join(f"t{i},{'c' * 40}{i}\n" for i in range(20_000))
    return [
        ("overlong multipart boundary", {"Content-Type": "multipart/form-data; boundary=" + "B" * 300}, b"x"),
        (
            "huge JSON string",
            {"Content-Type": "application/json"},
            json.dumps({"name": HUGE, "inputs": [HUGE]}).encode(),
        ),
        (
            "huge JSON list",
            {"Content-Type": "application/json"},
            json.dumps({"inputs": ["x"] * 300_000}).encode(),
        ),
        ("deep JSON", {"Content-Type": "application/json"}, b"[" * 100_000 + b"]" * 100_000),
        (
            "JSON over the cap",
            {"Content-Type": "application/json"},
            b'{"a": "' + b"x" * (9 * 1024 * 1024) + b'"}',
        ),
        (
            "20,000 classes",
            {"Content-Type": "multipart/form-data; boundary=graftboundary"},
            (
                '--graftboundary\r\nContent-Disposition: form-data; name="task"\r\n\r\ntext_classification\r\n'
                '--graftboundary\r\nContent-Disposition: form-data; name="config"\r\n\r\n'
                + json.dumps(
                    {"architecture": "mlp", "classes": [f"{'c' * 1000}{i}" for i in range(20_000)][:50]}
                )
                + '\r\n--graftboundary\r\nContent-Disposition: form-data; name="file"; filename="many.csv"\r\n\r\n'
                + many_classes
                + "\r\n--graftboundary--\r\n"
            ).encode(),
        ),
    ]


def test_hostile_bodies_get_a_4xx_on_every_operation(client: Any) -> None:
    """The bodies of the outside attack on the service, sent to every operation that takes one: a clear
    4xx each time (never a 5xx), and the service answers as before afterwards."""
    spec = client.get("/openapi.json").json()
    auth = {"Authorization": f"Bearer {ADMIN_KEY}"}
    answered: list[tuple[str, str, str, int]] = []
    for path, item in spec["paths"].items():
        for method, operation in item.items():
            if "requestBody" not in operation:
                continue
            url = re.sub(r"\{[^}]+\}", "x_does_not_exist", path)
            for what, headers, body in _hostile_bodies():
                response = client.request(method.upper(), url, content=body, headers={**auth, **headers})
                answered.append((method, path, what, response.status_code))
                assert 400 <= response.status_code < 500, (method, path, what, response.text[:500])
                assert set(response.json()["error"]) == {"code", "message", "param"}
    assert {path for _, path, _, _ in answered} >= {"/v1/datasets", "/v1/models", "/v1/jobs", "/v1/uploads"}
    assert client.get("/healthz").status_code == 200
