from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response, status
from fastapi.responses import FileResponse
from sqlalchemy.orm import Session

from app.core.deps import ContextDep, PrincipalDep
from app.core.errors import ERROR_RESPONSES, ErrorResponse
from app.core.pagination import AfterQuery, LimitQuery, ListResponse, paginate
from app.datasets import service, storage_quota
from app.datasets.schemas import DatasetOut, Deleted
from app.datasets.upload import receive_multipart
from graft.formats import TASKS
from graft.tables import Dataset

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
async def upload_dataset(request: Request, context: ContextDep, principal: PrincipalDep) -> Dataset:
    # No unit of work is open while the file streams in and while it is validated; the dataset's row is
    # written in a short one at the end.
    declared = request.headers.get("content-length")
    await context.db.read(
        storage_quota.check_room,
        context.storage,
        context.settings,
        principal,
        int(declared) if declared and declared.isdigit() else 0,
        param="file",
    )
    upload = await receive_multipart(request, context.storage, max_bytes=context.settings.max_upload_bytes)
    prepared = await context.compute(service.prepare_dataset, context.storage, context.settings, upload)
    return await context.db.write(service.register_dataset, context.storage, principal, prepared)


@router.get("", response_model=ListResponse[DatasetOut], summary="List datasets")
async def list_datasets(
    context: ContextDep, principal: PrincipalDep, limit: LimitQuery = 20, after: AfterQuery = None
) -> Response:
    def page(session: Session) -> dict[str, object]:
        rows, has_more = paginate(
            session, Dataset, [Dataset.project_id == principal.project_id], after=after, limit=limit
        )
        return {"data": rows, "has_more": has_more}

    return await context.read_json(ListResponse[DatasetOut], page)


@router.get("/{dataset_id}", response_model=DatasetOut, summary="Get a dataset")
async def get_dataset(dataset_id: str, context: ContextDep, principal: PrincipalDep) -> Response:
    return await context.read_json(DatasetOut, service.get_dataset, principal, dataset_id)


@router.get(
    "/{dataset_id}/content",
    summary="Download the dataset's original bytes",
    description=(
        "The file exactly as it was uploaded, as an attachment. Graft never alters your data: a CSV cell "
        "that begins with `=`, `+`, `-` or `@` is served as it is, and a spreadsheet program may read it "
        "as a formula (open CSV files from untrusted sources as text)."
    ),
    response_class=FileResponse,
    responses={200: {"content": {"application/octet-stream": {}}, "description": "The uploaded file"}},
)
async def get_dataset_content(dataset_id: str, context: ContextDep, principal: PrincipalDep) -> FileResponse:
    row = await context.db.read(service.get_dataset, principal, dataset_id)
    return FileResponse(
        context.storage.existing(row.path, f"the file of dataset {row.id}"),
        media_type=MEDIA_TYPES.get(row.format, "application/octet-stream"),
        filename=row.filename or f"{row.id}.{row.format}",
        headers={"X-Content-Type-Options": "nosniff"},
    )


@router.delete(
    "/{dataset_id}",
    response_model=Deleted,
    summary="Delete a dataset",
    responses={409: {"model": ErrorResponse, "description": "A queued or running job uses it"}},
)
async def delete_dataset(dataset_id: str, context: ContextDep, principal: PrincipalDep) -> dict[str, object]:
    row = await context.db.write(service.delete_dataset, context.storage, principal, dataset_id)
    return {"id": row.id, "object": "dataset", "deleted": True}
