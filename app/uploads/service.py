"""Resumable uploads, for datasets too large to send in one request over a connection that may break.

An upload session is created with the file's size (and, best, its SHA-256). Chunks are appended with
`PATCH` at the session's offset (`Upload-Offset`, as in the tus protocol): a chunk at the wrong offset
gets 409 and the offset to resume from. When a connection breaks mid-chunk, the bytes that arrived are
kept and the offset moves past them, so the client asks for the offset and sends the rest. A chunk never
takes the file beyond its declared size (413), whether or not the request declared its length. Once the
file is complete, `POST /v1/uploads/{id}/dataset` checks its SHA-256 and validates it exactly as a direct
upload is validated; a dataset that fails validation (or a commit that fails) leaves the upload whole, to
try again.

The database holds the committed offset; the file can only be longer when a process died between writing
and committing, and those bytes are cut off before the next chunk. One writer at a time per upload: a
file lock, held from reading the offset until the new offset is committed. Uploads that stop growing are removed by the reaper after `upload_expiry_seconds`.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import os
from datetime import timedelta
from pathlib import PurePosixPath
from typing import Any, BinaryIO

import anyio
from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session
from starlette.requests import ClientDisconnect, Request

from app.core.errors import (
    Conflict,
    InvalidRequest,
    PayloadTooLarge,
    Unprocessable,
    UnsupportedMediaType,
    not_found,
)
from app.core.security import Principal
from app.datasets import service as datasets
from app.datasets import storage_quota
from app.datasets.upload import HEAD_BYTES, ReceivedUpload
from app.uploads.schemas import DatasetFromUpload, UploadCreate
from graft.config import Settings
from graft.db import Database, after_commit, after_rollback
from graft.errors import StorageFull
from graft.ids import new_id, utcnow
from graft.storage import Storage, is_disk_full, sha256_file
from graft.tables import Dataset, Upload
from graft.text import unsafe_character

CHUNK_CONTENT_TYPE = "application/offset+octet-stream"


def describe(row: Upload, settings: Settings) -> dict[str, Any]:
    return {
        "id": row.id,
        "project_id": row.project_id,
        "filename": row.filename,
        "size": row.size,
        "offset": row.offset,
        "sha256": row.sha256,
        "complete": row.offset == row.size,
        "created_at": row.created_at,
        "updated_at": row.updated_at,
        "expires_at": row.updated_at + timedelta(seconds=settings.upload_expiry_seconds),
    }


def create_upload(
    session: Session, storage: Storage, settings: Settings, principal: Principal, body: UploadCreate
) -> Upload:
    if body.size > settings.max_upload_bytes:
        raise PayloadTooLarge(
            f"the file is larger than the upload limit of {settings.max_upload_bytes} bytes", param="size"
        )
    problem = unsafe_character(body.filename)
    if problem:
        raise Unprocessable(f"the file name contains {problem}", param="filename", code="invalid_request")
    storage_quota.serialise_reservations(session)
    storage_quota.check_room(session, storage, settings, principal, body.size, param="size")
    upload_id = new_id("upl")
    key = f"uploads/{upload_id}.part"
    path = storage.path(key)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch()
    after_rollback(session, lambda: storage.delete(key))
    now = utcnow()
    row = Upload(
        id=upload_id,
        project_id=principal.project_id,
        filename=PurePosixPath(body.filename).name or "upload",
        size=body.size,
        sha256=body.sha256.lower() if body.sha256 else None,
        offset=0,
        path=key,
        created_at=now,
        updated_at=now,
    )
    session.add(row)
    session.flush()
    return row


def get_upload(session: Session, principal: Principal, upload_id: str) -> Upload:
    row = session.scalar(
        select(Upload).where(Upload.id == upload_id, Upload.project_id == principal.project_id)
    )
    if row is None:
        raise not_found("upload", upload_id)
    return row


def delete_upload(session: Session, storage: Storage, principal: Principal, upload_id: str) -> None:
    row = get_upload(session, principal, upload_id)
    session.delete(row)
    after_commit(session, lambda: storage.delete(row.path))


def _chunk_checksum(header: str | None) -> bytes | None:
    """`Upload-Checksum: sha256 <base64 digest>` (tus's checksum extension), optional."""
    if header is None:
        return None
    algorithm, _, value = header.strip().partition(" ")
    if algorithm.lower() != "sha256":
        raise InvalidRequest("Upload-Checksum: only sha256 is supported", param="Upload-Checksum")
    try:
        digest = base64.b64decode(value.strip(), validate=True)
    except ValueError:
        digest = b""
    if len(digest) != 32:
        raise InvalidRequest(
            "Upload-Checksum: expected 'sha256 <base64 of 32 bytes>'", param="Upload-Checksum"
        )
    return digest


# Chunks are written (and hashed) in threads, a buffer of this many bytes at a time: the event loop never
# waits for the disk, and a thread hop costs little next to a megabyte.
WRITE_BUFFER_BYTES = 1024 * 1024


def _lock(handle: BinaryIO, upload_id: str) -> None:
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise Conflict(
            "another request is writing to this upload", param="Upload-Offset", code="upload_busy"
        ) from None


def _write(handle: BinaryIO, digest: Any, data: bytes) -> None:
    handle.write(data)
    digest.update(data)


def _seal(handle: BinaryIO) -> None:
    handle.flush()
    os.fsync(handle.fileno())


def _set_offset(session: Session, principal: Principal, upload_id: str, offset: int) -> Upload:
    session.execute(
        update(Upload)
        .where(Upload.id == upload_id, Upload.project_id == principal.project_id)
        .values(offset=offset, updated_at=utcnow())
        .execution_options(synchronize_session=False)
    )
    return get_upload(session, principal, upload_id)


async def append_chunk(
    request: Request, db: Database, storage: Storage, principal: Principal, upload_id: str
) -> Upload:
    """Append the request body at the upload's offset. No unit of work is open while the bytes stream in,
    and no disk write happens on the event loop; the new offset is committed at the end (also when the
    client goes away mid-chunk)."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type != CHUNK_CONTENT_TYPE:
        raise UnsupportedMediaType(f"send the chunk as {CHUNK_CONTENT_TYPE}", param="Content-Type")
    offset_header = request.headers.get("upload-offset")
    if offset_header is None:
        raise InvalidRequest(
            "the Upload-Offset header (where this chunk starts) is required", param="Upload-Offset"
        )
    if not offset_header.isdigit() or not offset_header.isascii():
        raise InvalidRequest(
            f"Upload-Offset must be a whole number of bytes, not {offset_header[:40]!r}",
            param="Upload-Offset",
        )
    start = int(offset_header)
    expected = _chunk_checksum(request.headers.get("upload-checksum"))
    row = await db.read(get_upload, principal, upload_id)
    try:
        handle = await anyio.to_thread.run_sync(storage.path(row.path).open, "r+b")
    except FileNotFoundError:
        raise not_found("upload", upload_id) from None
    try:  # the lock is held until the new offset is committed, and goes with the handle
        await anyio.to_thread.run_sync(_lock, handle, upload_id)
        row = await db.read(get_upload, principal, upload_id)  # the offset, now that no one else can move it
        if start != row.offset:
            raise Conflict(
                f"this upload is at offset {row.offset}, not {start}: send the chunk from {row.offset}",
                param="Upload-Offset",
                code="offset_mismatch",
                headers={"Upload-Offset": str(row.offset)},
            )

        def rewind() -> None:  # also drops bytes a crashed writer left beyond the committed offset
            handle.truncate(start)
            handle.seek(start)

        await anyio.to_thread.run_sync(rewind)
        digest = hashlib.sha256()
        written = 0
        pending: list[bytes] = []
        pending_bytes = 0
        disconnected = False
        try:
            try:
                async for chunk in request.stream():
                    if start + written + pending_bytes + len(chunk) > row.size:
                        raise PayloadTooLarge(
                            f"this chunk goes beyond the upload's declared size of {row.size} bytes",
                            param="size",
                        )
                    pending.append(chunk)
                    pending_bytes += len(chunk)
                    if pending_bytes >= WRITE_BUFFER_BYTES:
                        await anyio.to_thread.run_sync(_write, handle, digest, b"".join(pending))
                        written += pending_bytes
                        pending, pending_bytes = [], 0
            except ClientDisconnect:
                disconnected = True  # keep what arrived: the client resumes from the new offset
            if pending:
                await anyio.to_thread.run_sync(_write, handle, digest, b"".join(pending))
                written += pending_bytes
            if expected is not None and not disconnected and digest.digest() != expected:
                raise Unprocessable(
                    "the chunk's SHA-256 does not match Upload-Checksum; it was not stored",
                    param="Upload-Checksum",
                    code="checksum_mismatch",
                )
            if disconnected and expected is not None:
                await anyio.to_thread.run_sync(handle.truncate, start)  # a checked chunk is all or nothing
                written = 0
            await anyio.to_thread.run_sync(_seal, handle)
        except BaseException as exc:  # nothing of a refused or failed chunk stays
            await anyio.to_thread.run_sync(handle.truncate, start)
            if is_disk_full(exc):
                raise StorageFull(
                    "the service's storage is full; this chunk was not stored. Retry it once space is freed",
                    param="file",
                ) from None
            raise
        return await db.write(_set_offset, principal, upload_id, start + written)
    finally:
        await anyio.to_thread.run_sync(handle.close)


def _upload_to_consume(session: Session, principal: Principal, upload_id: str) -> Upload:
    row = get_upload(session, principal, upload_id)
    if row.offset != row.size:
        raise Conflict(
            f"the upload is incomplete: {row.offset} of {row.size} bytes; send the rest from offset {row.offset}",
            code="upload_incomplete",
        )
    return row


def prepare_dataset(
    storage: Storage, settings: Settings, row: Upload, body: DatasetFromUpload
) -> datasets.PreparedDataset:
    """Hash and validate a complete upload (no unit of work is open meanwhile)."""
    part = storage.path(row.path)
    try:
        digest = sha256_file(part)
    except FileNotFoundError:
        raise Conflict(f"upload {row.id} already became a dataset", code="upload_consumed") from None
    if row.sha256 is not None and digest != row.sha256:
        raise Unprocessable(
            f"the file's SHA-256 is {digest}, not the {row.sha256} declared: the upload is damaged; delete it "
            "and upload again",
            param="sha256",
            code="checksum_mismatch",
        )
    with part.open("rb") as handle:
        head = handle.read(HEAD_BYTES)
    # The dataset gets a second name of the same file: the upload keeps its own until the dataset is
    # committed, so a failure anywhere (validation, the database) leaves the upload whole to try again.
    linked = storage.new_temp_path()
    os.link(part, linked)
    fields = {k: v for k, v in body.model_dump().items() if v is not None}
    received = ReceivedUpload(
        fields=fields, path=linked, filename=row.filename, size=row.size, sha256=digest, head=head
    )
    return datasets.prepare_dataset(storage, settings, received)


def consume_upload(
    session: Session,
    storage: Storage,
    principal: Principal,
    row: Upload,
    prepared: datasets.PreparedDataset,
) -> Dataset:
    """The dataset's row, and the upload gone, in one unit of work."""
    dataset = datasets.register_dataset(session, storage, principal, prepared)
    consumed = session.execute(
        delete(Upload).where(Upload.id == row.id).execution_options(synchronize_session=False)
    )
    if consumed.rowcount != 1:  # type: ignore[attr-defined]
        raise Conflict(f"upload {row.id} already became a dataset", code="upload_consumed")
    after_commit(session, lambda: storage.delete(row.path))
    return dataset


async def create_dataset(
    db: Database,
    compute: Any,
    storage: Storage,
    settings: Settings,
    principal: Principal,
    upload_id: str,
    body: DatasetFromUpload,
) -> Dataset:
    row = await db.read(_upload_to_consume, principal, upload_id)
    prepared = await compute(prepare_dataset, storage, settings, row, body)
    return await db.write(consume_upload, storage, principal, row, prepared)


def remove_abandoned(session: Session, storage: Storage, settings: Settings) -> list[str]:
    """Uploads that have not grown for `upload_expiry_seconds`, and stray temporary files as old: removed."""
    cutoff = utcnow() - timedelta(seconds=settings.upload_expiry_seconds)
    rows = list(session.scalars(select(Upload).where(Upload.updated_at < cutoff)))
    for row in rows:
        session.delete(row)
        after_commit(session, lambda key=row.path: storage.delete(key))  # type: ignore[misc]
    stale = cutoff.timestamp()
    for entry in storage.tmp_dir.iterdir():
        with contextlib.suppress(OSError):
            if entry.is_file() and entry.stat().st_mtime < stale:
                entry.unlink()
    return [row.id for row in rows]
