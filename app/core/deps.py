"""Request dependencies: the service context, the unit-of-work session, and the calling principal."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session, sessionmaker

from app.core import db
from app.core.config import Settings
from app.core.errors import Forbidden, RateLimited, Unauthorized
from app.core.queue import JobQueue
from app.core.ratelimit import NoLimit, RateLimiter
from app.core.security import Principal, digest_matches, key_lookup
from app.core.storage import Storage
from app.tables import ApiKey

if TYPE_CHECKING:
    from app.models.serving import ModelServer


@dataclass
class ServiceContext:
    settings: Settings
    engine: Engine
    session_factory: sessionmaker[Session]
    storage: Storage
    queue: JobQueue
    model_server: ModelServer
    limiter: RateLimiter = field(default_factory=NoLimit)


def get_context(request: Request) -> ServiceContext:
    return request.app.state.context  # type: ignore[no-any-return]


ContextDep = Annotated[ServiceContext, Depends(get_context)]


def get_session(context: ContextDep) -> Iterator[Session]:
    """The request's unit of work: committed when the route returns (before the response is sent),
    rolled back when it raises."""
    session = context.session_factory()
    try:
        yield session
    except BaseException:
        db.rollback(session)
        raise
    else:
        db.commit(session)
    finally:
        session.close()


SessionDep = Annotated[Session, Depends(get_session, scope="function")]

bearer = HTTPBearer(auto_error=False, description="An API key: `Authorization: Bearer graft_...`")
CHALLENGE = {"WWW-Authenticate": "Bearer"}


def get_principal(
    context: ContextDep,
    session: SessionDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> Principal:
    if credentials is None or not credentials.credentials:
        raise Unauthorized("Missing API key: send 'Authorization: Bearer <key>'", headers=CHALLENGE)
    key = credentials.credentials
    row = session.scalar(select(ApiKey).where(ApiKey.lookup == key_lookup(key)))
    if row is None or row.revoked_at is not None or not digest_matches(key, row.digest):
        raise Unauthorized("Unknown or revoked API key", headers=CHALLENGE)
    wait = context.limiter.hit(row.id)
    if wait is not None:
        raise RateLimited(
            f"this API key made more than {context.settings.rate_limit_per_minute} requests this minute; "
            f"retry in {wait} s",
            headers={"Retry-After": str(wait)},
        )
    return Principal(project_id=row.project_id, key_id=row.id, role=row.role)


PrincipalDep = Annotated[Principal, Depends(get_principal)]


def require_admin(principal: PrincipalDep) -> Principal:
    if not principal.is_admin:
        raise Forbidden("This needs an admin API key")
    return principal


AdminDep = Annotated[Principal, Depends(require_admin)]
