"""Room for an upload, checked before a byte of it is stored: the storage volume's free space (less what
unfinished resumable uploads have declared and not sent yet, and a reserve) and, when configured, the
project's share of the storage (`GRAFT_PROJECT_STORAGE_BYTES`)."""

from __future__ import annotations

import shutil

from sqlalchemy import func, select, text
from sqlalchemy.orm import Session

from app.core.security import Principal
from graft.config import Settings
from graft.errors import GraftError, StorageFull
from graft.storage import Storage
from graft.tables import Checkpoint, Dataset, Model, Upload


class StorageQuotaExceeded(GraftError):
    status_code = 413
    code = "storage_quota_exceeded"


def reserved_bytes(session: Session, project_id: str | None = None) -> int:
    """What unfinished uploads (every project's, or one's) declared and have not sent yet."""
    stmt = select(func.coalesce(func.sum(Upload.size - Upload.offset), 0))
    if project_id is not None:
        stmt = stmt.where(Upload.project_id == project_id)
    return int(session.scalar(stmt) or 0)


def project_usage(session: Session, project_id: str) -> int:
    """Bytes a project holds: datasets, unfinished uploads (as declared), models and checkpoints."""
    total = 0
    for column, owner in (
        (Dataset.bytes, Dataset.project_id),
        (Upload.size, Upload.project_id),
        (Model.weights_bytes, Model.project_id),
        (Checkpoint.bytes, Checkpoint.project_id),
    ):
        total += int(
            session.scalar(select(func.coalesce(func.sum(column), 0)).where(owner == project_id)) or 0
        )
    return total


def serialise_reservations(session: Session) -> None:
    """Two uploads declared at once must not both count the same free space: on PostgreSQL a transaction
    lock orders them (SQLite's write lock already does)."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("SELECT pg_advisory_xact_lock(7421942)"))


def check_room(
    session: Session, storage: Storage, settings: Settings, principal: Principal, size: int, *, param: str
) -> None:
    """Refuse `size` more bytes for the principal's project (0: the size is not known yet)."""
    usage = shutil.disk_usage(storage.root)
    # The reserve keeps room for the database, training state and checkpoints; on a small volume it is a
    # twentieth of it rather than all of it.
    reserve = min(settings.min_free_bytes, usage.total // 20)
    mine = reserved_bytes(session, principal.project_id)
    others = reserved_bytes(session) - mine
    available = usage.free - reserve - others  # what this project could use, beside the others' uploads
    room = available - mine
    if size > room:
        raise StorageFull(
            f"the service's storage has room for {max(room, 0)} more bytes (free space, less what unfinished "
            f"uploads declared and a reserve of {reserve} bytes) and this upload declares {size}; nothing "
            "was stored",
            param=param,
        )
    # One project's unfinished uploads may hold at most half of that room: declaring uploads it never sends
    # cannot lock the other projects out of the disk until they expire.
    if mine + size > available // 2:
        raise StorageFull(
            f"this project's unfinished uploads already declare {mine} bytes; with {size} more they would hold "
            f"more than half of the {max(available, 0)} bytes of room left. Finish or delete some of them",
            param=param,
            code="storage_reservation_exceeded",
        )
    share = settings.project_storage_bytes
    if share:
        used = project_usage(session, principal.project_id)
        if used + size > share or used >= share:
            raise StorageQuotaExceeded(
                f"this project holds {used} bytes of its {share}-byte storage share; {size} more do not fit. "
                "Delete datasets, uploads or models to make room",
                param=param,
            )
