"""JSON responses serialised by pydantic in one step (the route's response_model still documents them)."""

from __future__ import annotations

from pydantic import BaseModel
from starlette.responses import Response


def model_response(model: BaseModel, status_code: int = 200) -> Response:
    return Response(model.model_dump_json(), status_code=status_code, media_type="application/json")


def raw_json_response(body: bytes | str, status_code: int = 200) -> Response:
    return Response(body, status_code=status_code, media_type="application/json")
