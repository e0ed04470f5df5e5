"""Fuzzing the whole API from its OpenAPI spec with schemathesis, in process (no worker consumes this
queue, so fuzzed jobs stay queued): for a bounded number of generated requests per operation, including
invalid ones, no 5xx and every response matches its documented schema."""

from __future__ import annotations

from typing import Any

import schemathesis
from hypothesis import HealthCheck, Phase, given
from hypothesis import settings as hypothesis_settings
from schemathesis.checks import not_a_server_error, response_schema_conformance

from app.core.config import Settings
from app.main import create_app
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
