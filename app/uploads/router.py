"""Resumable uploads: `POST /v1/uploads`, `PATCH /v1/uploads/{id}` chunks at offsets, then
`POST /v1/uploads/{id}/dataset`."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response, status

from app.core.deps import ContextDep, PrincipalDep
from app.core.errors import ERROR_RESPONSES, ErrorResponse
from app.datasets.schemas import DatasetOut
from app.uploads import service
from app.uploads.schemas import DatasetFromUpload, UploadCreate, UploadOut
from graft.tables import Dataset

router = APIRouter(prefix="/v1/uploads", tags=["datasets"], responses=ERROR_RESPONSES)

CHUNK_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {service.CHUNK_CONTENT_TYPE: {"schema": {"type": "string", "format": "binary"}}},
    },
    "parameters": [
        {
            "name": "Upload-Offset",
            "in": "header",
            "required": True,
            "schema": {"type": "integer", "minimum": 0},
            "description": "Where this chunk starts: the upload's current `offset`.",
        },
        {
            "name": "Upload-Checksum",
            "in": "header",
            "required": False,
            "schema": {"type": "string"},
            "description": "`sha256 <base64 digest>` of this chunk; a chunk that does not match is not stored.",
        },
    ],
}


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=UploadOut,
    summary="Start a resumable upload",
    description=(
        "For large files over connections that may break. Declare the file's `size` (and best its `sha256`), "
        "then send it in chunks with `PATCH /v1/uploads/{id}`; if a connection breaks, `GET` the upload and "
        "send the rest from its `offset`. When `complete`, `POST /v1/uploads/{id}/dataset` makes it a dataset. "
        "An upload that does not grow for `GRAFT_UPLOAD_EXPIRY_SECONDS` is removed."
    ),
    responses={413: {"model": ErrorResponse, "description": "Larger than the upload limit"}},
)
async def create_upload(body: UploadCreate, context: ContextDep, principal: PrincipalDep) -> dict[str, Any]:
    row = await context.db.write(service.create_upload, context.storage, context.settings, principal, body)
    return service.describe(row, context.settings)


@router.get("/{upload_id}", response_model=UploadOut, summary="Where an upload stands (its offset)")
async def get_upload(upload_id: str, context: ContextDep, principal: PrincipalDep) -> dict[str, Any]:
    return service.describe(await context.db.read(service.get_upload, principal, upload_id), context.settings)


@router.patch(
    "/{upload_id}",
    response_model=UploadOut,
    summary="Append a chunk at the upload's offset",
    description=(
        f"The body is the chunk (`Content-Type: {service.CHUNK_CONTENT_TYPE}`), with `Upload-Offset` set to "
        "the upload's current offset. A broken connection keeps the bytes that arrived: `GET` the upload and "
        "resume from its new offset. A chunk at another offset gets 409 (the right offset is in `Upload-Offset` "
        "of the answer); one that goes beyond the declared size gets 413 and is not stored."
    ),
    openapi_extra=CHUNK_BODY,
    responses={
        409: {"model": ErrorResponse, "description": "Wrong offset, or another request is writing"},
        413: {"model": ErrorResponse, "description": "Beyond the declared size"},
        415: {"model": ErrorResponse, "description": "Not application/offset+octet-stream"},
    },
)
async def append_chunk(
    upload_id: str, request: Request, context: ContextDep, principal: PrincipalDep
) -> dict[str, Any]:
    row = await service.append_chunk(request, context.db, context.storage, principal, upload_id)
    return service.describe(row, context.settings)


@router.post(
    "/{upload_id}/dataset",
    status_code=status.HTTP_201_CREATED,
    response_model=DatasetOut,
    summary="Make a complete upload a dataset",
    description=(
        "Checks the file's SHA-256 against the declared one and validates it as `POST /v1/datasets` does; "
        "the upload is consumed. A file that fails validation (422) stays uploaded, to try other options."
    ),
    responses={409: {"model": ErrorResponse, "description": "The upload is not complete yet"}},
)
async def create_dataset(
    upload_id: str, body: DatasetFromUpload, context: ContextDep, principal: PrincipalDep
) -> Dataset:
    return await service.create_dataset(
        context.db, context.compute, context.storage, context.settings, principal, upload_id, body
    )


@router.delete(
    "/{upload_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    response_class=Response,
    summary="Abandon an upload",
)
async def delete_upload(upload_id: str, context: ContextDep, principal: PrincipalDep) -> Response:
    await context.db.write(service.delete_upload, context.storage, principal, upload_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)
