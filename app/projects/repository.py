"""All SQL of projects and API keys."""

from __future__ import annotations

from sqlalchemy import ColumnElement, bindparam, select
from sqlalchemy.orm import Session

from graft.tables import ApiKey, Project


def get_project(session: Session, project_id: str) -> Project | None:
    return session.scalar(select(Project).where(Project.id == project_id))


def first_project(session: Session) -> Project | None:
    return session.scalar(select(Project).order_by(Project.pk).limit(1))


def project_filter(project_id: str | None) -> list[ColumnElement[bool]]:
    return [] if project_id is None else [Project.id == project_id]


def key_by_lookup(session: Session, lookup: str) -> ApiKey | None:
    return session.scalar(select(ApiKey).where(ApiKey.lookup == lookup))


def get_key(session: Session, project_id: str, key_id: str) -> ApiKey | None:
    return session.scalar(select(ApiKey).where(ApiKey.id == key_id, ApiKey.project_id == project_id))


def add(session: Session, row: Project | ApiKey) -> None:
    session.add(row)
    session.flush()


# The auth middleware's one read per key it has not seen lately (app/core/auth.py).
KEY_BY_LOOKUP = select(ApiKey.id, ApiKey.project_id, ApiKey.role, ApiKey.digest, ApiKey.revoked_at).where(
    ApiKey.lookup == bindparam("lookup")
)
