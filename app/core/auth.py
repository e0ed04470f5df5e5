"""Authentication before anything else: every `/v1` request's API key is checked (and its rate limit
counted) by an ASGI middleware, before the body is read, so an unauthenticated request costs a header
parse and never a buffered body.

Keys are resolved once per request, cheaply: a short-lived cache keyed by the key's lookup hash holds
what the database said about it (project, role, digest, revoked), for `key_cache_seconds`. Revoking a
key drops it from the cache of the API process that revoked it at once; other API processes see the
revocation within `key_cache_seconds`. On a miss the key is read with the async reader: one round trip
on PostgreSQL, no thread.
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from app.core.errors import error_payload
from app.core.ratelimit import RateLimiter
from app.core.reads import DatabaseUnavailable, Reader
from app.core.security import Principal, digest_matches, key_lookup

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

PRINCIPAL_SCOPE_KEY = "graft.principal"
CHALLENGE = [(b"www-authenticate", b"Bearer")]
MAX_CACHED_KEYS = 10_000


@dataclass(frozen=True)
class KeyRecord:
    principal: Principal
    digest: str
    revoked: bool


class KeyCache:
    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._entries: dict[str, tuple[float, KeyRecord]] = {}

    def get(self, lookup: str) -> KeyRecord | None:
        entry = self._entries.get(lookup)
        if entry is None:
            return None
        if entry[0] < time.monotonic():
            self._entries.pop(lookup, None)
            return None
        return entry[1]

    def put(self, lookup: str, record: KeyRecord) -> None:
        if self.seconds <= 0:
            return
        if len(self._entries) >= MAX_CACHED_KEYS:
            now = time.monotonic()
            self._entries = {k: v for k, v in self._entries.items() if v[0] >= now}
            if len(self._entries) >= MAX_CACHED_KEYS:
                self._entries.clear()
        self._entries[lookup] = (time.monotonic() + self.seconds, record)

    def forget(self, lookup: str) -> None:
        self._entries.pop(lookup, None)


class AuthError(Exception):
    def __init__(self, status: int, code: str, message: str, headers: list[tuple[bytes, bytes]]) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers


@dataclass
class Authenticator:
    """What the middleware needs: where keys are read from, the cache, and the rate limit."""

    reader: Reader
    cache: KeyCache
    limiter: RateLimiter
    rate_limit_per_minute: int

    async def record(self, key: str) -> KeyRecord | None:
        from app.projects.repository import KEY_BY_LOOKUP

        lookup = key_lookup(key)
        record = self.cache.get(lookup)
        if record is None:
            row = await self.reader.one(KEY_BY_LOOKUP, {"lookup": lookup})
            if row is None:
                return None  # unknown keys are not cached: a key created a moment later works at once
            revoked_at: datetime | None = row["revoked_at"]
            record = KeyRecord(
                principal=Principal(project_id=row["project_id"], key_id=row["id"], role=row["role"]),
                digest=row["digest"],
                revoked=revoked_at is not None,
            )
            self.cache.put(lookup, record)
        return record

    async def authenticate(self, authorization: str | None) -> Principal:
        if not authorization:
            raise AuthError(
                401, "unauthorized", "Missing API key: send 'Authorization: Bearer <key>'", CHALLENGE
            )
        scheme, _, key = authorization.partition(" ")
        key = key.strip()
        if scheme.lower() != "bearer" or not key:
            raise AuthError(
                401, "unauthorized", "Send the API key as 'Authorization: Bearer <key>'", CHALLENGE
            )
        record = await self.record(key)
        if record is None or record.revoked or not digest_matches(key, record.digest):
            raise AuthError(401, "unauthorized", "Unknown or revoked API key", CHALLENGE)
        wait = await self.limiter.hit(record.principal.key_id)
        if wait is not None:
            raise AuthError(
                429,
                "rate_limited",
                f"this API key made more than {self.rate_limit_per_minute} requests this minute; "
                f"retry in {wait} s",
                [(b"retry-after", str(wait).encode())],
            )
        return record.principal


class AuthMiddleware:
    """Resolves the principal of every `/v1` request into the ASGI scope, or answers 401/429/503 without
    reading the body."""

    def __init__(self, app: ASGIApp, *, prefix: str = "/v1/") -> None:
        self.app = app
        self.prefix = prefix

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope.get("path", "").startswith(self.prefix):
            await self.app(scope, receive, send)
            return
        authenticator: Authenticator = scope["app"].state.context.authenticator
        authorization = None
        for name, value in scope.get("headers", []):
            if name == b"authorization":
                authorization = value.decode("latin-1")
                break
        try:
            scope[PRINCIPAL_SCOPE_KEY] = await authenticator.authenticate(authorization)
        except AuthError as exc:
            if not _is_a_route(scope):
                await self.app(scope, receive, send)  # no such route or method: the router's 404 or 405
                return
            await _reject(send, exc.status, exc.code, exc.message, exc.headers)
            return
        except DatabaseUnavailable:
            await _reject(
                send,
                503,
                "database_unavailable",
                "The database is unreachable; retry after a few seconds (a job created with an "
                "Idempotency-Key is never created twice)",
                [(b"retry-after", b"5")],
            )
            return
        await self.app(scope, receive, send)


def _is_a_route(scope: Scope) -> bool:
    """Whether a route takes this path and method (checked only for requests that failed to authenticate)."""
    from starlette.routing import Match

    return any(route.matches(scope)[0] == Match.FULL for route in scope["app"].router.routes)


async def _reject(
    send: Send, status: int, code: str, message: str, headers: list[tuple[bytes, bytes]]
) -> None:
    body = json.dumps(error_payload(code, message, None)).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
