"""Projects and API keys. The instance operator (the bootstrap key) manages every project; a project's
admin keys manage that project's keys only; member keys manage nothing."""

from __future__ import annotations

from fastapi import APIRouter, status
from sqlalchemy.orm import Session

from app.core.deps import AdminDep, ContextDep, OperatorDep, PrincipalDep
from app.core.errors import ERROR_RESPONSES
from app.core.pagination import AfterQuery, LimitQuery, ListResponse, paginate
from app.projects import service
from app.projects.schemas import ApiKeyCreate, ApiKeyCreated, ApiKeyOut, ProjectCreate, ProjectOut
from graft.tables import ApiKey, Project

router = APIRouter(prefix="/v1/projects", tags=["projects"], responses=ERROR_RESPONSES)


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=ProjectOut,
    summary="Create a project (the instance operator's key)",
)
async def create_project(body: ProjectCreate, context: ContextDep, _operator: OperatorDep) -> Project:
    return await context.db.write(service.create_project, body.name)


@router.get(
    "", response_model=ListResponse[ProjectOut], summary="List projects (the operator sees every one)"
)
async def list_projects(
    context: ContextDep, principal: PrincipalDep, limit: LimitQuery = 20, after: AfterQuery = None
) -> dict[str, object]:
    def page(session: Session) -> dict[str, object]:
        where = [] if principal.is_operator else [Project.id == principal.project_id]
        rows, has_more = paginate(session, Project, where, after=after, limit=limit)
        return {"data": rows, "has_more": has_more}

    return await context.db.read(page)


@router.get("/{project_id}", response_model=ProjectOut, summary="Get a project")
async def get_project(project_id: str, context: ContextDep, principal: PrincipalDep) -> Project:
    return await context.db.read(service.visible_project, principal, project_id)


@router.post(
    "/{project_id}/api_keys",
    status_code=status.HTTP_201_CREATED,
    response_model=ApiKeyCreated,
    summary="Create an API key for a project (its admin, or the operator); the key is shown once",
)
async def create_api_key(
    project_id: str, body: ApiKeyCreate, context: ContextDep, admin: AdminDep
) -> dict[str, object]:
    def create(session: Session) -> dict[str, object]:
        project = service.managed_project(session, admin, project_id)
        row, key = service.create_api_key(session, project, role=body.role, name=body.name, creator=admin)
        return {**ApiKeyOut.model_validate(row).model_dump(), "key": key}

    return await context.db.write(create)


@router.get(
    "/{project_id}/api_keys",
    response_model=ListResponse[ApiKeyOut],
    summary="List a project's API keys (its admin, or the operator); only a short prefix of each is shown",
)
async def list_api_keys(
    project_id: str, context: ContextDep, admin: AdminDep, limit: LimitQuery = 20, after: AfterQuery = None
) -> dict[str, object]:
    def page(session: Session) -> dict[str, object]:
        project = service.managed_project(session, admin, project_id)
        rows, has_more = paginate(
            session, ApiKey, [ApiKey.project_id == project.id], after=after, limit=limit
        )
        return {"data": rows, "has_more": has_more}

    return await context.db.read(page)


@router.delete(
    "/{project_id}/api_keys/{key_id}",
    response_model=ApiKeyOut,
    summary="Revoke an API key (its project's admin, or the operator); it stops working at once",
)
async def revoke_api_key(project_id: str, key_id: str, context: ContextDep, admin: AdminDep) -> ApiKey:
    def revoke(session: Session) -> ApiKey:
        project = service.managed_project(session, admin, project_id)
        return service.revoke_api_key(session, project, key_id, revoker=admin)

    row = await context.db.write(revoke)
    context.authenticator.cache.forget(row.lookup)
    return row
