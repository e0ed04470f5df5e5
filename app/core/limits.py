"""Request guards in front of every route: a cap on body size (the streaming upload routes enforce their
own, larger limit as they write to disk), and paths or queries with characters no store can hold."""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any
from urllib.parse import unquote

from starlette.exceptions import HTTPException

from app.core.errors import error_payload
from graft.text import unsafe_character

_NOT_UTF8 = re.compile("[\udc80-\udcff]")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class BodyTooLarge(HTTPException):
    """Raised from `receive` when a body grows past its cap; rendered as 413 by the error handler."""

    def __init__(self, limit: int) -> None:
        super().__init__(status_code=413, detail=f"request bodies are limited to {limit} bytes")


class RequestGuard:
    """Paths and queries no store can hold are refused; bodies are capped as they arrive.

    A body is never buffered here: `receive` is wrapped to count bytes, so a route reads at most the cap
    (and an unauthenticated request, refused by the auth middleware before this guard, reads nothing).
    Multipart bodies (images to predict on) have the larger cap, every other body the JSON cap. The
    streaming upload routes enforce their own, larger limit as they write to disk."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        max_body_bytes: int,
        max_json_bytes: int,
        streaming_routes: set[tuple[str, str]],
    ) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.max_json_bytes = max_json_bytes
        # ("PATCH", "/v1/uploads/{id}"): a `{...}` part matches one path segment.
        self.streaming_routes = [
            (method, re.compile("^" + re.sub(r"\\\{[^/]*\\\}", "[^/]+", re.escape(path)) + "$"))
            for method, path in streaming_routes
        ]

    def _streams(self, method: str, path: str) -> bool:
        return any(method == m and pattern.match(path) for m, pattern in self.streaming_routes)

    async def _reject(self, send: Send, status: int, code: str, message: str, param: str | None) -> None:
        body = json.dumps(error_payload(code, message, param)).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        query = unquote(scope.get("query_string", b"").decode("latin-1"), errors="surrogateescape")
        for part, value in (("path", scope.get("path", "")), ("query", query)):
            # Bytes that are not UTF-8 arrive here as surrogate escapes: say what they were.
            problem = "a byte that is not UTF-8" if _NOT_UTF8.search(value) else unsafe_character(value)
            if problem:
                await self._reject(
                    send, 400, "invalid_request", f"the request {part} contains {problem}", None
                )
                return
        if self._streams(scope["method"], scope["path"].rstrip("/")):
            await self.app(scope, receive, send)
            return
        # Only multipart bodies (images to predict on) may be as large as max_body_bytes; every other body
        # (JSON, any +json type, or one without a Content-Type, which FastAPI reads as JSON too) has the
        # JSON cap.
        limit = min(self.max_json_bytes, self.max_body_bytes)
        for name, value in scope.get("headers", []):
            if name == b"content-type" and value.split(b";")[0].strip().lower() == b"multipart/form-data":
                limit = self.max_body_bytes
        for name, value in scope.get("headers", []):
            if name == b"content-length" and value.isdigit() and int(value) > limit:
                await self._reject(
                    send, 413, "payload_too_large", f"request bodies are limited to {limit} bytes", None
                )
                return
        received = 0

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(limit)
            return message

        await self.app(scope, counted, send)
