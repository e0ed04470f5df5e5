"""Request dependencies: the service context and the calling principal. Both are async and do no I/O (the
principal was resolved by the auth middleware before the body was read), so they cost no thread hop.

Routes are `async def`; their blocking work runs in one hop per unit of work: `context.db.read(fn, ...)`
or `context.db.write(fn, ...)` for the database, `context.compute(fn, ...)` for CPU-heavy work (model
inference, evaluation, dataset validation, report drawing), which has threads of its own.
"""

from __future__ import annotations

import asyncio
import functools
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import anyio
from fastapi import Depends, Request, Response
from pydantic import BaseModel, TypeAdapter

from app.core.auth import PRINCIPAL_SCOPE_KEY, Authenticator
from app.core.errors import ClientGone, Forbidden, Unauthorized
from app.core.reads import Reader
from app.core.security import Principal
from graft.config import Settings
from graft.db import Database
from graft.queueing import JobQueue
from graft.storage import Storage

if TYPE_CHECKING:
    from app.models.serving import ModelServer

T = TypeVar("T")


@dataclass
class ServiceContext:
    settings: Settings
    db: Database
    reader: Reader
    storage: Storage
    queue: JobQueue
    model_server: ModelServer
    authenticator: Authenticator
    compute_limiter: anyio.CapacityLimiter
    predict_limiter: anyio.CapacityLimiter
    # Report pictures are drawn on a lane of their own: a drawing never holds a compute thread that an
    # upload's validation or an evaluation is waiting for.
    draw_limiter: anyio.CapacityLimiter = field(default_factory=lambda: anyio.CapacityLimiter(1))
    _keyed_locks: dict[str, asyncio.Lock] = field(default_factory=dict)

    async def compute(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """CPU-heavy work (evaluation, ranking, validation, imports, report drawing), at most
        `compute_concurrency` at a time, off the threads that answer the rest."""
        return await anyio.to_thread.run_sync(
            functools.partial(fn, *args, **kwargs), limiter=self.compute_limiter
        )

    async def predict(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Predictions: a lane of their own, so that long evaluations or rankings never hold them up."""
        return await anyio.to_thread.run_sync(
            functools.partial(fn, *args, **kwargs), limiter=self.predict_limiter
        )

    def once_at_a_time(self, key: str) -> asyncio.Lock:
        """A lock per key, in the event loop: work that concurrent requests would otherwise repeat (drawing
        one job's report picture) is done by the first while the others wait for its result."""
        lock = self._keyed_locks.get(key)
        if lock is None:
            if len(self._keyed_locks) > 1000:  # forget keys nobody is waiting for
                self._keyed_locks = {k: v for k, v in self._keyed_locks.items() if v.locked()}
            lock = self._keyed_locks[key] = asyncio.Lock()
        return lock

    async def compute_while_connected(
        self,
        request: Request,
        fn: Callable[..., T],
        *args: Any,
        lane: anyio.CapacityLimiter | None = None,
        **kwargs: Any,
    ) -> T:
        """`compute` for work that reports its batches through an `on_batch` keyword: it stops at the next
        batch once the client has gone away, instead of holding a compute thread for nobody. `lane`: the
        threads it runs on (the compute threads unless said)."""
        gone = threading.Event()

        def on_batch() -> None:
            if gone.is_set():
                raise ClientGone()

        async def watch() -> None:
            while not await request.is_disconnected():
                await anyio.sleep(0.5)
            gone.set()

        watcher = asyncio.create_task(watch())
        try:
            return await anyio.to_thread.run_sync(
                functools.partial(fn, *args, on_batch=on_batch, **kwargs),
                limiter=lane or self.compute_limiter,
            )
        finally:
            watcher.cancel()

    async def read_json(
        self,
        response_type: type[BaseModel] | TypeAdapter[Any],
        fn: Callable[..., Any],
        *args: Any,
        **kwargs: Any,
    ) -> Response:
        """A read unit whose answer is validated as `response_type` and serialised in the same thread: a
        large answer (a page of datasets or models with a thousand classes each, a report's confusion
        matrices) costs the event loop nothing but sending it."""

        def run() -> bytes:
            value = self.db.read_sync(fn, *args, **kwargs)
            if isinstance(response_type, TypeAdapter):
                return response_type.dump_json(response_type.validate_python(value))
            return response_type.model_validate(value).model_dump_json().encode()

        return Response(await anyio.to_thread.run_sync(run), media_type="application/json")

    async def blocking(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Short blocking work that is not the database's (a file's header, a broker call)."""
        return await anyio.to_thread.run_sync(functools.partial(fn, *args, **kwargs))


async def get_context(request: Request) -> ServiceContext:
    return request.app.state.context  # type: ignore[no-any-return]


ContextDep = Annotated[ServiceContext, Depends(get_context)]

# The key was checked by the auth middleware; OpenAPI learns of the scheme from app.main (every /v1
# operation carries it), so no route solves a dependency per request just to document it.
SECURITY_SCHEME = {
    "HTTPBearer": {
        "type": "http",
        "scheme": "bearer",
        "description": "An API key: `Authorization: Bearer graft_...`",
    }
}


async def get_principal(request: Request) -> Principal:
    principal: Principal | None = request.scope.get(PRINCIPAL_SCOPE_KEY)
    if principal is None:  # a route outside /v1 asked for a principal: a programming error, not the client's
        raise Unauthorized("Missing API key: send 'Authorization: Bearer <key>'")
    return principal


PrincipalDep = Annotated[Principal, Depends(get_principal)]


def caller(request: Request) -> tuple[ServiceContext, Principal]:
    """The context and principal of a request, without FastAPI's dependency solving: for the status
    polling routes, which are most of the traffic and where that solving was a quarter of the cost."""
    principal: Principal | None = request.scope.get(PRINCIPAL_SCOPE_KEY)
    if principal is None:
        raise Unauthorized("Missing API key: send 'Authorization: Bearer <key>'")
    return request.app.state.context, principal


async def require_admin(principal: PrincipalDep) -> Principal:
    if not principal.is_admin:
        raise Forbidden("This needs an admin API key")
    return principal


AdminDep = Annotated[Principal, Depends(require_admin)]


async def require_operator(principal: PrincipalDep) -> Principal:
    if not principal.is_operator:
        raise Forbidden("This needs the instance operator's API key (the bootstrap key)")
    return principal


OperatorDep = Annotated[Principal, Depends(require_operator)]
