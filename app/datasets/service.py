"""Dataset rules: validate an upload completely before it becomes a dataset; never leave half a file."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import PurePosixPath

from sqlalchemy.orm import Session

from app.core.errors import Conflict, Unprocessable, not_found
from app.core.security import Principal
from app.datasets import repository
from app.datasets.upload import ReceivedUpload
from graft import job_store
from graft.config import Settings
from graft.db import after_commit, after_rollback
from graft.formats import TASKS, ArchiveLimits, FormatError, detect_format, inspect_dataset
from graft.ids import new_id, utcnow
from graft.storage import Storage
from graft.tables import Dataset
from graft.text import unsafe_character

UPLOAD_FIELDS = {"task", "name", "text_column", "label_column"}


def archive_limits(settings: Settings) -> ArchiveLimits:
    return ArchiveLimits(
        max_members=settings.max_archive_members,
        max_uncompressed_bytes=settings.max_archive_uncompressed_bytes,
        max_compression_ratio=settings.max_compression_ratio,
        max_image_pixels=settings.max_image_pixels,
        max_archive_pixels=settings.max_archive_pixels,
        max_classes=settings.max_classes,
        max_class_chars=settings.max_class_chars,
        max_column_chars=settings.max_column_chars,
    )


def _optional_field(fields: dict[str, str], name: str) -> str | None:
    value = fields.get(name)
    if value is None:
        return None
    value = value.strip()
    if not value:
        raise Unprocessable(f"'{name}' is empty", param=name, code="invalid_request")
    return value


@dataclass
class PreparedDataset:
    """A validated upload, its file already in its place in storage; the row is written next."""

    row: Dataset
    folder: str


def prepare_dataset(storage: Storage, settings: Settings, upload: ReceivedUpload) -> PreparedDataset:
    """Validate the received upload completely and move its file into place (the temporary file is moved
    or removed). No database work: this may take a while, and no unit of work is open meanwhile."""
    try:
        fields = upload.fields
        for field_name, value in fields.items():
            problem = unsafe_character(field_name + value)
            if problem:
                raise Unprocessable(
                    f"form field '{field_name}' contains {problem}", param=field_name, code="invalid_request"
                )
        if upload.filename is not None and unsafe_character(upload.filename):
            raise Unprocessable(
                "the file name contains a character that cannot be stored",
                param="file",
                code="invalid_request",
            )
        unknown = sorted(set(fields) - UPLOAD_FIELDS)
        if unknown:
            raise Unprocessable(
                f"unknown form field '{unknown[0]}' (expected: file, {', '.join(sorted(UPLOAD_FIELDS))})",
                param=unknown[0],
                code="invalid_request",
            )
        task = fields.get("task", "").strip()
        if not task:
            raise Unprocessable(
                "'task' is required: one of " + ", ".join(TASKS), param="task", code="invalid_request"
            )
        if task not in TASKS:
            raise Unprocessable(
                f"unknown task '{task}': one of " + ", ".join(TASKS), param="task", code="invalid_request"
            )
        if upload.path is None:
            raise Unprocessable("a 'file' part is required", param="file", code="invalid_request")
        if upload.size == 0:
            raise Unprocessable("the file is empty", param="file")
        name = (
            _optional_field(fields, "name") or (PurePosixPath(upload.filename or "").name or "dataset")[-300:]
        )
        if len(name) > 300:
            raise Unprocessable("'name' is longer than 300 characters", param="name", code="invalid_request")
        try:
            fmt = detect_format(upload.filename, upload.head)
            info = inspect_dataset(
                upload.path,
                task=task,
                fmt=fmt,
                text_column=_optional_field(fields, "text_column"),
                label_column=_optional_field(fields, "label_column"),
                limits=archive_limits(settings),
            )
        except FormatError as exc:
            raise Unprocessable(exc.message, param=exc.param) from None

        dataset_id = new_id("ds")
        folder = f"datasets/{dataset_id}"
        key = f"{folder}/data.{fmt}"
        storage.commit(upload.path, key)
    finally:
        upload.discard()

    row = Dataset(
        id=dataset_id,
        project_id="",  # set when registered
        name=name,
        task=task,
        format=info.format,
        num_examples=info.num_examples,
        labeled=info.labeled,
        classes=info.classes,
        class_counts=info.class_counts,
        schema_info=info.schema_info,
        pixels=info.pixels,
        profile=info.profile,
        bytes=upload.size,
        sha256=upload.sha256,
        filename=PurePosixPath(upload.filename).name[-300:] if upload.filename else None,
        path=key,
        created_at=utcnow(),
    )
    return PreparedDataset(row=row, folder=folder)


def register_dataset(
    session: Session, storage: Storage, principal: Principal, prepared: PreparedDataset
) -> Dataset:
    """Write the row of a prepared dataset; if the unit of work fails, its file goes too."""
    after_rollback(session, lambda: storage.delete_tree(prepared.folder))
    prepared.row.project_id = principal.project_id
    repository.add(session, prepared.row)
    return prepared.row


def create_dataset(
    session: Session,
    storage: Storage,
    settings: Settings,
    principal: Principal,
    upload: ReceivedUpload,
) -> Dataset:
    """Validate and register in the caller's unit of work (tests, tools); the API prepares outside one."""
    return register_dataset(session, storage, principal, prepare_dataset(storage, settings, upload))


def get_dataset(
    session: Session,
    principal: Principal,
    dataset_id: str,
    param: str | None = None,
    *,
    for_update: bool = False,
) -> Dataset:
    row = repository.get(session, principal.project_id, dataset_id, for_update=for_update)
    if row is None:
        raise not_found("dataset", dataset_id, param=param)
    return row


def delete_dataset(session: Session, storage: Storage, principal: Principal, dataset_id: str) -> Dataset:
    row = get_dataset(session, principal, dataset_id, for_update=True)
    job_id = job_store.active_job_using(session, row.id)
    if job_id is not None:
        raise Conflict(
            f"dataset {row.id} is used by {job_id}, which is queued or running", code="dataset_in_use"
        )
    repository.delete(session, row)
    folder = f"datasets/{row.id}"
    after_commit(session, lambda: storage.delete_tree(folder))
    return row
