"""Projects, API keys, and the bootstrap of the default project's admin key."""

from __future__ import annotations

import os
from dataclasses import dataclass

from sqlalchemy.orm import Session

from app.core.config import Settings
from app.core.errors import not_found
from app.core.ids import new_id, utcnow
from app.core.security import (
    ROLE_ADMIN,
    Principal,
    display_prefix,
    generate_api_key,
    key_digest,
    key_lookup,
)
from app.projects import repository
from app.tables import ApiKey, Project

DEFAULT_PROJECT_NAME = "default"


def create_project(session: Session, name: str) -> Project:
    project = Project(id=new_id("proj"), name=name, created_at=utcnow())
    repository.add(session, project)
    return project


def visible_project(session: Session, principal: Principal, project_id: str) -> Project:
    """Admins see every project; a member key sees its own. Anything else is a 404."""
    project = repository.get_project(session, project_id)
    if project is None or (not principal.is_admin and project.id != principal.project_id):
        raise not_found("project", project_id)
    return project


def create_api_key(
    session: Session, project: Project, *, role: str, name: str | None, key: str | None = None
) -> tuple[ApiKey, str]:
    secret = key or generate_api_key()
    row = ApiKey(
        id=new_id("key"),
        project_id=project.id,
        name=name,
        role=role,
        lookup=key_lookup(secret),
        digest=key_digest(secret),
        prefix=display_prefix(secret),
        created_at=utcnow(),
    )
    repository.add(session, row)
    return row, secret


def revoke_api_key(session: Session, project: Project, key_id: str) -> ApiKey:
    row = repository.get_key(session, project.id, key_id)
    if row is None:
        raise not_found("api_key", key_id)
    if row.revoked_at is None:
        row.revoked_at = utcnow()
    return row


@dataclass
class Bootstrap:
    project: Project
    key: str | None  # None when the key came from GRAFT_BOOTSTRAP_API_KEY (never echoed)
    created: bool


def bootstrap(session: Session, settings: Settings) -> Bootstrap:
    """Make sure the default project and its admin key exist. Safe to run at every start.

    The key is GRAFT_BOOTSTRAP_API_KEY when set; otherwise one generated on the first start and kept in
    $GRAFT_HOME/admin.key (mode 0600), so later starts reuse it."""
    project = repository.first_project(session) or create_project(session, DEFAULT_PROJECT_NAME)
    if settings.bootstrap_api_key is not None:
        key = settings.bootstrap_api_key.get_secret_value()
        if repository.key_by_lookup(session, key_lookup(key)) is None:
            create_api_key(session, project, role=ROLE_ADMIN, name="bootstrap", key=key)
            return Bootstrap(project, None, created=True)
        return Bootstrap(project, None, created=False)
    key_file = settings.admin_key_file
    if key_file.exists():
        key = key_file.read_text().strip()
        if repository.key_by_lookup(session, key_lookup(key)) is None:
            create_api_key(session, project, role=ROLE_ADMIN, name="admin", key=key)
            return Bootstrap(project, key, created=True)
        return Bootstrap(project, key, created=False)
    _, key = create_api_key(session, project, role=ROLE_ADMIN, name="admin")
    key_file.parent.mkdir(parents=True, exist_ok=True)
    temp = key_file.with_suffix(".tmp")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(key + "\n")
    os.replace(temp, key_file)
    return Bootstrap(project, key, created=True)
