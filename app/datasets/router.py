from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, status
from fastapi.responses import FileResponse
from starlette.concurrency import run_in_threadpool

from app.core.deps import ContextDep, PrincipalDep, SessionDep
from app.core.errors import ERROR_RESPONSES, ErrorResponse
from app.core.pagination import AfterQuery, LimitQuery, ListResponse, paginate
from app.datasets import service
from app.datasets.formats import TASKS
from app.datasets.schemas import DatasetOut, Deleted
from app.datasets.upload import receive_multipart
from app.tables import Dataset

router = APIRouter(prefix="/v1/datasets", tags=["datasets"], responses=ERROR_RESPONSES)

MEDIA_TYPES = {"csv": "text/csv", "jsonl": "application/jsonl", "zip": "application/zip"}

UPLOAD_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file", "task"],
                    "properties": {
                        "file": {
                            "type": "string",
                            "format": "binary",
                            "description": "CSV or JSONL (text, tabular) or ZIP of PNG/JPEG images (one folder "
                            "per class, or images at the root for unlabelled data).",
                        },
                        "task": {"type": "string", "enum": list(TASKS)},
                        "name": {"type": "string", "description": "Defaults to the file name."},
                        "text_column": {"type": "string", "description": "Text datasets; default `text`."},
                        "label_column": {
                            "type": "string",
                            "description": "Default `label`; without one the dataset is unlabelled.",
                        },
                    },
                }
            }
        },
    }
}


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=DatasetOut,
    summary="Upload a dataset",
    description=(
        "Streams the file to storage (sha256 computed on the way, size limit `GRAFT_MAX_UPLOAD_BYTES` enforced "
        "while reading: 413) and validates it completely before it becomes a dataset: a 422 names the row, "
        "line or file and the column. Archives are checked for unsafe paths, links and zip bombs."
    ),
    openapi_extra=UPLOAD_BODY,
    responses={413: {"model": ErrorResponse, "description": "Larger than the upload limit"}},
)
async def upload_dataset(
    request: Request, context: ContextDep, session: SessionDep, principal: PrincipalDep
) -> Dataset:
    session.commit()  # no transaction stays open (SQLite: no write lock held) while the file streams in
    upload = await receive_multipart(request, context.storage, max_bytes=context.settings.max_upload_bytes)
    return await run_in_threadpool(
        service.create_dataset, session, context.storage, context.settings, principal, upload
    )


@router.get("", response_model=ListResponse[DatasetOut], summary="List datasets")
def list_datasets(
    session: SessionDep, principal: PrincipalDep, limit: LimitQuery = 20, after: AfterQuery = None
) -> dict[str, object]:
    rows, has_more = paginate(
        session, Dataset, [Dataset.project_id == principal.project_id], after=after, limit=limit
    )
    return {"data": rows, "has_more": has_more}


@router.get("/{dataset_id}", response_model=DatasetOut, summary="Get a dataset")
def get_dataset(dataset_id: str, session: SessionDep, principal: PrincipalDep) -> Dataset:
    return service.get_dataset(session, principal, dataset_id)


@router.get(
    "/{dataset_id}/content",
    summary="Download the dataset's original bytes",
    response_class=FileResponse,
    responses={200: {"content": {"application/octet-stream": {}}, "description": "The uploaded file"}},
)
def get_dataset_content(
    dataset_id: str, context: ContextDep, session: SessionDep, principal: PrincipalDep
) -> FileResponse:
    row = service.get_dataset(session, principal, dataset_id)
    return FileResponse(
        context.storage.path(row.path),
        media_type=MEDIA_TYPES.get(row.format, "application/octet-stream"),
        filename=row.filename or f"{row.id}.{row.format}",
    )


@router.delete(
    "/{dataset_id}",
    response_model=Deleted,
    summary="Delete a dataset",
    responses={409: {"model": ErrorResponse, "description": "A queued or running job uses it"}},
)
def delete_dataset(
    dataset_id: str, context: ContextDep, session: SessionDep, principal: PrincipalDep
) -> dict[str, object]:
    row = service.delete_dataset(session, context.storage, principal, dataset_id)
    return {"id": row.id, "object": "dataset", "deleted": True}
