"""Projects, API keys, and the bootstrap of the default project's admin key."""

from __future__ import annotations

import os
from dataclasses import dataclass

from sqlalchemy.orm import Session

from app.core.errors import Forbidden, not_found
from app.core.security import (
    ROLE_OPERATOR,
    Principal,
    display_prefix,
    generate_api_key,
    key_digest,
    key_lookup,
)
from app.projects import repository
from graft.config import Settings
from graft.ids import new_id, utcnow
from graft.tables import ApiKey, Project

DEFAULT_PROJECT_NAME = "default"


def create_project(session: Session, name: str) -> Project:
    project = Project(id=new_id("proj"), name=name, created_at=utcnow())
    repository.add(session, project)
    return project


def visible_project(session: Session, principal: Principal, project_id: str) -> Project:
    """The operator sees every project; any other key its own. Anything else is a 404."""
    project = repository.get_project(session, project_id)
    if project is None or not principal.sees(project.id):
        raise not_found("project", project_id)
    return project


def managed_project(session: Session, principal: Principal, project_id: str) -> Project:
    """A project whose keys the principal manages; another project is a 404, as if it did not exist."""
    project = visible_project(session, principal, project_id)
    if not principal.manages(project.id):
        raise Forbidden("This needs an admin API key of this project")
    return project


def create_api_key(
    session: Session,
    project: Project,
    *,
    role: str,
    name: str | None,
    key: str | None = None,
    creator: Principal | None = None,
) -> tuple[ApiKey, str]:
    if role == ROLE_OPERATOR and creator is not None and not creator.is_operator:
        raise Forbidden("Only the instance operator can create operator keys", param="role")
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


def revoke_api_key(
    session: Session, project: Project, key_id: str, *, revoker: Principal | None = None
) -> ApiKey:
    row = repository.get_key(session, project.id, key_id)
    if row is None:
        raise not_found("api_key", key_id)
    if row.role == ROLE_OPERATOR and revoker is not None and not revoker.is_operator:
        raise Forbidden("Only the instance operator can revoke an operator key")
    if row.revoked_at is None:
        row.revoked_at = utcnow()
    return row


@dataclass
class Bootstrap:
    project: Project
    key: str | None  # None when the key came from GRAFT_BOOTSTRAP_API_KEY (never echoed)
    created: bool
    revoked: bool = False  # the bootstrap key exists but was revoked: it is no key to show


def _ensure_operator(session: Session, project: Project, key: str, name: str) -> tuple[bool, bool]:
    """The operator key `key` exists (created now?) and is valid (revoked?). A key made before operators
    existed (role admin) becomes the operator's."""
    row = repository.key_by_lookup(session, key_lookup(key))
    if row is None:
        create_api_key(session, project, role=ROLE_OPERATOR, name=name, key=key)
        return True, False
    if row.role != ROLE_OPERATOR and row.revoked_at is None:
        row.role = ROLE_OPERATOR
    return False, row.revoked_at is not None


def bootstrap(session: Session, settings: Settings) -> Bootstrap:
    """Make sure the default project and the operator's key exist. Safe to run at every start.

    The key is GRAFT_BOOTSTRAP_API_KEY when set; otherwise one generated on the first start and kept in
    $GRAFT_HOME/admin.key (mode 0600), so later starts reuse it. A revoked one stays revoked (it is not
    shown as valid); `python -m app.cli prestart --new-operator-key` makes a new one."""
    project = repository.first_project(session) or create_project(session, DEFAULT_PROJECT_NAME)
    if settings.bootstrap_api_key is not None:
        key = settings.bootstrap_api_key.get_secret_value()
        created, revoked = _ensure_operator(session, project, key, "bootstrap")
        return Bootstrap(project, None, created=created, revoked=revoked)
    key_file = settings.admin_key_file
    if key_file.exists():
        key = key_file.read_text().strip()
        created, revoked = _ensure_operator(session, project, key, "admin")
        return Bootstrap(project, key, created=created, revoked=revoked)
    return new_operator_key(session, settings, project)


def new_operator_key(session: Session, settings: Settings, project: Project | None = None) -> Bootstrap:
    """A fresh operator key, kept in $GRAFT_HOME/admin.key (mode 0600) in place of the old one."""
    project = project or repository.first_project(session) or create_project(session, DEFAULT_PROJECT_NAME)
    _, key = create_api_key(session, project, role=ROLE_OPERATOR, name="admin")
    key_file = settings.admin_key_file
    key_file.parent.mkdir(parents=True, exist_ok=True)
    temp = key_file.with_suffix(".tmp")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(key + "\n")
    os.replace(temp, key_file)
    return Bootstrap(project, key, created=True)
