"""One exception hierarchy, rendered by one handler as `{"error": {"code", "message", "param"}}`."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from sqlalchemy.exc import DBAPIError
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.core.reads import DatabaseUnavailable
from graft.db import is_unreachable
from graft.errors import GraftError, InvalidData
from graft.storage import is_disk_full

log = logging.getLogger("graft.api")

DATABASE_RETRY_AFTER_SECONDS = 5


class InvalidRequest(GraftError):
    status_code = 400
    code = "invalid_request"


class Unauthorized(GraftError):
    status_code = 401
    code = "unauthorized"


class Forbidden(GraftError):
    status_code = 403
    code = "forbidden"


class NotFound(GraftError):
    status_code = 404
    code = "not_found"


class Conflict(GraftError):
    status_code = 409
    code = "conflict"


class PayloadTooLarge(GraftError):
    status_code = 413
    code = "payload_too_large"


class UnsupportedMediaType(GraftError):
    status_code = 415
    code = "unsupported_media_type"


class Unprocessable(InvalidData):
    status_code = 422
    code = "invalid_data"


class RateLimited(GraftError):
    status_code = 429
    code = "rate_limited"


class ServiceUnavailable(GraftError):
    status_code = 503
    code = "service_unavailable"


class ClientGone(GraftError):
    """The client of a long computation went away, and the computation stopped (nobody reads the answer;
    the status is nginx's for a client that closed its request)."""

    status_code = 499
    code = "client_gone"

    def __init__(self) -> None:
        super().__init__("the client disconnected; the computation stopped")


class ErrorBody(BaseModel):
    code: str
    message: str
    param: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


def not_found(kind: str, object_id: str, param: str | None = None) -> NotFound:
    return NotFound(f"No {kind} with id '{object_id}'", param=param, code=f"{kind}_not_found")


# An error names what is wrong; it never echoes a client's megabytes back (a validation message can quote
# the offending value).
MAX_MESSAGE_CHARS = 1000
MAX_PARAM_CHARS = 200


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def error_payload(code: str, message: str, param: str | None) -> dict[str, Any]:
    return {
        "error": {
            "code": code,
            "message": _clip(message, MAX_MESSAGE_CHARS),
            "param": None if param is None else _clip(param, MAX_PARAM_CHARS),
        }
    }


# Responses documented on every route that can fail.
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": description}
    for status, description in {
        400: "Invalid request",
        401: "Missing or unknown API key",
        404: "Not found (also for objects of another project)",
        422: "Invalid data; `param` names the field, row or file",
        429: "Too many requests with this API key; retry after `Retry-After` seconds",
        503: "The database is unreachable; retry after `Retry-After` seconds",
        507: "The service's storage is full; nothing was stored",
    }.items()
}

_STATUS_CODES = {
    400: "invalid_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "invalid_request",
    429: "rate_limited",
    503: "service_unavailable",
    507: "storage_full",
}


# Values of `type` that select a request schema in a tagged union; pydantic puts the tag in an error's
# location, which a client's field name does not have.
UNION_TAGS: set[str] = set()
# The names pydantic gives the plain members of a union (`baseline: bool | list[str]`).
UNION_MEMBERS = {"bool", "int", "float", "str"}


def param_from_loc(loc: tuple[Any, ...]) -> str | None:
    """A pydantic error location as the client's field path (`hyperparameters.epochs`, `inputs.0`): without
    FastAPI's `body.` and the names pydantic gives the members of a union (`list[str]`, a tag)."""
    parts = [str(p) for p in loc]
    if parts and parts[0] in {"body", "query", "path", "header", "cookie", "form"}:
        parts = parts[1:]
        if parts and parts[0] in UNION_TAGS:
            parts = parts[1:]
    parts = [p for p in parts if not ("[" in p or "(" in p) and p not in UNION_MEMBERS]
    return ".".join(parts) or None


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(GraftError)
    async def _graft_error(_request: Request, exc: GraftError) -> JSONResponse:
        return JSONResponse(
            error_payload(exc.code, exc.message, exc.param), status_code=exc.status_code, headers=exc.headers
        )

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        # Of the errors of a union's members (`baseline`: a boolean, or a list of arms), the one that went
        # deepest says what is wrong (the second arm is too long), not that the value is no boolean.
        first = (
            max(errors, key=lambda error: len(error.get("loc", ())))
            if errors
            else {"loc": (), "msg": "Invalid request"}
        )
        loc = tuple(first.get("loc", ()))
        if first.get("type") in ("union_tag_invalid", "union_tag_not_found"):
            # The request schema is chosen by a field (`type`): name that field.
            ctx: Any = first.get("ctx") or {}
            loc = (*loc, str(ctx.get("discriminator", "")).strip("'"))
        param = param_from_loc(loc)
        message = str(first.get("msg", "Invalid request"))
        if param:
            message = f"{param}: {message}"
        if len(errors) > 1:
            message += f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})"
        return JSONResponse(error_payload("invalid_request", message, param), status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = _STATUS_CODES.get(exc.status_code, "error")
        return JSONResponse(
            error_payload(code, str(exc.detail), None),
            status_code=exc.status_code,
            headers=getattr(exc, "headers", None),
        )

    def _unavailable() -> JSONResponse:
        return JSONResponse(
            error_payload(
                "database_unavailable",
                "The database is unreachable; retry after a few seconds (a job created with an "
                "Idempotency-Key is never created twice)",
                None,
            ),
            status_code=503,
            headers={"Retry-After": str(DATABASE_RETRY_AFTER_SECONDS)},
        )

    @app.exception_handler(DBAPIError)
    async def _database_error(_request: Request, exc: DBAPIError) -> JSONResponse:
        if is_unreachable(exc):
            log.warning("database unreachable: %s", type(exc.orig).__name__)
            return _unavailable()
        return internal_error(exc)

    @app.exception_handler(DatabaseUnavailable)
    async def _reader_unavailable(_request: Request, _exc: DatabaseUnavailable) -> JSONResponse:
        return _unavailable()

    @app.exception_handler(OSError)
    async def _os_error(_request: Request, exc: OSError) -> JSONResponse:
        if is_disk_full(exc):
            log.error("storage full: %s", exc)
            return JSONResponse(
                error_payload(
                    "storage_full",
                    "The service's storage is full; nothing was stored. Retry once space is freed",
                    None,
                ),
                status_code=507,
            )
        return internal_error(exc)


def internal_error(exc: BaseException) -> JSONResponse:
    """The 500 every unexpected error gets: logged whole for the operator, nothing of it for the client."""
    log.error("unhandled error", exc_info=exc)
    return JSONResponse(
        error_payload("internal_error", "The server failed to handle this request", None), status_code=500
    )


class CatchAll:
    """The outermost middleware: an error no handler knows becomes a 500 that ends the request normally.

    Starlette's own last-resort handler sends its 500 and then raises the error again, for the server to
    log; uvicorn then closes the connection under the client, so the next request a client sends on that
    keep-alive connection is reset. Here the error is logged and answered, and the connection stays
    usable. Only an error after the response has started (nothing can be sent any more) goes on up, and
    the server closes that connection."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracked(message: dict[str, Any]) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        except Exception as exc:
            if started:
                raise
            await internal_error(exc)(scope, receive, send)
