from __future__ import annotations

from fastapi import APIRouter, status

from app.core.deps import AdminDep, PrincipalDep, SessionDep
from app.core.errors import ERROR_RESPONSES
from app.core.pagination import AfterQuery, LimitQuery, ListResponse, paginate
from app.projects import service
from app.projects.schemas import ApiKeyCreate, ApiKeyCreated, ApiKeyOut, ProjectCreate, ProjectOut
from app.tables import ApiKey, Project

router = APIRouter(prefix="/v1/projects", tags=["projects"], responses=ERROR_RESPONSES)


@router.post(
    "", status_code=status.HTTP_201_CREATED, response_model=ProjectOut, summary="Create a project (admin)"
)
def create_project(body: ProjectCreate, session: SessionDep, _admin: AdminDep) -> Project:
    return service.create_project(session, body.name)


@router.get("", response_model=ListResponse[ProjectOut], summary="List projects")
def list_projects(
    session: SessionDep, principal: PrincipalDep, limit: LimitQuery = 20, after: AfterQuery = None
) -> dict[str, object]:
    where = [] if principal.is_admin else [Project.id == principal.project_id]
    rows, has_more = paginate(session, Project, where, after=after, limit=limit)
    return {"data": rows, "has_more": has_more}


@router.get("/{project_id}", response_model=ProjectOut, summary="Get a project")
def get_project(project_id: str, session: SessionDep, principal: PrincipalDep) -> Project:
    return service.visible_project(session, principal, project_id)


@router.post(
    "/{project_id}/api_keys",
    status_code=status.HTTP_201_CREATED,
    response_model=ApiKeyCreated,
    summary="Create an API key for a project (admin); the key is shown once",
)
def create_api_key(
    project_id: str, body: ApiKeyCreate, session: SessionDep, admin: AdminDep
) -> dict[str, object]:
    project = service.visible_project(session, admin, project_id)
    row, key = service.create_api_key(session, project, role=body.role, name=body.name)
    return {**ApiKeyOut.model_validate(row).model_dump(), "key": key}


@router.get(
    "/{project_id}/api_keys",
    response_model=ListResponse[ApiKeyOut],
    summary="List a project's API keys (admin)",
)
def list_api_keys(
    project_id: str, session: SessionDep, admin: AdminDep, limit: LimitQuery = 20, after: AfterQuery = None
) -> dict[str, object]:
    project = service.visible_project(session, admin, project_id)
    rows, has_more = paginate(session, ApiKey, [ApiKey.project_id == project.id], after=after, limit=limit)
    return {"data": rows, "has_more": has_more}


@router.delete(
    "/{project_id}/api_keys/{key_id}", response_model=ApiKeyOut, summary="Revoke an API key (admin)"
)
def revoke_api_key(project_id: str, key_id: str, session: SessionDep, admin: AdminDep) -> ApiKey:
    project = service.visible_project(session, admin, project_id)
    return service.revoke_api_key(session, project, key_id)
