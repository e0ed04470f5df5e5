"""Database tables. The schema exists only through Alembic migrations (migrations/versions).

Every row has an integer `pk` (insertion order, used by list cursors) and a public prefixed `id`.
Every user-visible object carries its `project_id`; queries always filter on it.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    false,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Mapped, mapped_column

from graft.db import Base
from graft.ids import utcnow

JSONType = JSON().with_variant(JSONB(), "postgresql")


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every backend (SQLite stores them naive)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return value

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return value


class Project(Base):
    __tablename__ = "projects"

    pk: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(64), unique=True)
    name: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class ApiKey(Base):
    __tablename__ = "api_keys"

    pk: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(64), unique=True)
    project_id: Mapped[str] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"), index=True)
    name: Mapped[str | None] = mapped_column(String(200))
    role: Mapped[str] = mapped_column(String(16))
    # The key itself is never stored: `lookup` finds the row, `digest` is compared in constant time.
    lookup: Mapped[str] = mapped_column(String(32), unique=True)
    digest: Mapped[str] = mapped_column(String(64))
    prefix: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class Dataset(Base):
    __tablename__ = "datasets"
    __table_args__ = (Index("ix_datasets_project_pk", "project_id", "pk"),)

    pk: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(64), unique=True)
    project_id: Mapped[str] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(300))
    task: Mapped[str] = mapped_column(String(40))
    format: Mapped[str] = mapped_column(String(16))
    num_examples: Mapped[int] = mapped_column(Integer)
    labeled: Mapped[bool] = mapped_column(Boolean)
    classes: Mapped[list[str]] = mapped_column(JSONType, default=list)
    class_counts: Mapped[dict[str, int]] = mapped_column(JSONType, default=dict)
    # Format-specific facts the readers need: columns, feature names, archive layout.
    schema_info: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict)
    bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    filename: Mapped[str | None] = mapped_column(String(300))
    path: Mapped[str] = mapped_column(String(500))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    # Image datasets: the pixels of all images together (from their headers), for cost estimates.
    pixels: Mapped[int | None] = mapped_column(BigInteger)
    # What the data holds (graft.formats.DatasetInfo.profile): images' sizes, texts' mean length; None for a
    # dataset uploaded before profiles were.
    profile: Mapped[dict[str, Any] | None] = mapped_column(JSONType)


class Upload(Base):
    """A resumable upload: the file grows chunk by chunk at `offset` until it reaches `size`; then it
    becomes a dataset. Abandoned ones are removed once they have not grown for a while."""

    __tablename__ = "uploads"
    __table_args__ = (
        Index("ix_uploads_project_pk", "project_id", "pk"),
        Index("ix_uploads_updated_at", "updated_at"),
    )

    pk: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(64), unique=True)
    project_id: Mapped[str] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"))
    filename: Mapped[str] = mapped_column(String(300))
    size: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str | None] = mapped_column(String(64))  # as declared by the client; checked at the end
    offset: Mapped[int] = mapped_column(BigInteger, default=0)
    path: Mapped[str] = mapped_column(String(500))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class Model(Base):
    __tablename__ = "models"
    __table_args__ = (Index("ix_models_project_pk", "project_id", "pk"),)

    pk: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(64), unique=True)
    project_id: Mapped[str] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(300))
    kind: Mapped[str] = mapped_column(String(20))
    architecture: Mapped[str] = mapped_column(String(64))
    modality: Mapped[str] = mapped_column(String(16))
    classes: Mapped[list[str]] = mapped_column(JSONType, default=list)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict)
    # Everything needed to rebuild and serve the network: architecture options, classes, preprocessing.
    spec: Mapped[dict[str, Any]] = mapped_column(JSONType)
    num_parameters: Mapped[int] = mapped_column(BigInteger)
    job_id: Mapped[str | None] = mapped_column(String(64))
    base_model: Mapped[str | None] = mapped_column(String(64))
    training_dataset: Mapped[str | None] = mapped_column(String(64))
    weights_path: Mapped[str] = mapped_column(String(500))
    weights_bytes: Mapped[int] = mapped_column(BigInteger)
    weights_sha256: Mapped[str] = mapped_column(String(64))
    # LoRA models also keep their adapter on its own.
    adapter_path: Mapped[str | None] = mapped_column(String(500))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (
        Index("ix_jobs_project_pk", "project_id", "pk"),
        Index("ix_jobs_status", "status"),
        Index("ix_jobs_status_heartbeat_at", "status", "heartbeat_at"),
        UniqueConstraint("project_id", "idempotency_key", name="uq_jobs_project_idempotency_key"),
    )

    pk: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(64), unique=True)
    project_id: Mapped[str] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"))
    type: Mapped[str] = mapped_column(String(20))
    status: Mapped[str] = mapped_column(String(20))
    base_model: Mapped[str] = mapped_column(String(64))
    # Evaluation jobs have no training dataset and no method.
    training_dataset: Mapped[str | None] = mapped_column(String(64))
    validation_dataset: Mapped[str | None] = mapped_column(String(64))
    # adapt: the unlabelled target; adapt and distill: labelled data the report measures on.
    target_dataset: Mapped[str | None] = mapped_column(String(64))
    evaluation_dataset: Mapped[str | None] = mapped_column(String(64))
    # finetune: the unlabelled data of semi-supervised fine-tuning.
    unlabeled_dataset: Mapped[str | None] = mapped_column(String(64))
    methods: Mapped[list[str] | None] = mapped_column(JSONType)  # adapt: the adaptation methods
    student: Mapped[dict[str, Any] | None] = mapped_column(JSONType)  # distill: the student architecture
    method: Mapped[str | None] = mapped_column(String(32))
    hyperparameters: Mapped[dict[str, Any]] = mapped_column(JSONType)
    # The kind's typed, versioned spec (graft/jobspec.py): what the worker reads. The columns above are
    # drawn from it for listing and for the guards on datasets and models.
    spec: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    # The plan of its runs (graft/plan.py), priced and checked by the API, run by the worker; None for a job
    # stored before plans were (the worker plans it from its spec when it starts).
    plan: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    seed: Mapped[int] = mapped_column(BigInteger)
    # Transfer options as requested, and what the worker found.
    head: Mapped[str | None] = mapped_column(String(8))
    initialization: Mapped[str | None] = mapped_column(String(16))
    from_checkpoint: Mapped[str | None] = mapped_column(String(64))
    baseline: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    # The report's arms beside the transferred model: "scratch" first, then "parent", "as_is", model ids.
    baseline_arms: Mapped[list[str] | None] = mapped_column(JSONType)
    seeds: Mapped[list[int] | None] = mapped_column(JSONType)
    transfer: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    report: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    best_checkpoint: Mapped[str | None] = mapped_column(String(64))
    user_metadata: Mapped[dict[str, str] | None] = mapped_column("metadata", JSONType)
    idempotency_key: Mapped[str | None] = mapped_column(String(255))
    request_hash: Mapped[str | None] = mapped_column(String(64))
    progress: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    metrics: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    error: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    result_model: Mapped[str | None] = mapped_column(String(64))
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    # The lease of the worker running the job: who holds it, a fencing token that grows with every claim
    # (a worker whose token is no longer the job's has lost the lease and stops writing), and its heartbeat.
    lease_owner: Mapped[str | None] = mapped_column(String(255))
    lease_token: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))
    heartbeat_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # Set when the worker is shutting down: the job checkpoints and goes back to the queue.
    release_requested: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    worker_losses: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))  # leases expired
    dispatched_at: Mapped[datetime | None] = mapped_column(UTCDateTime)  # last sent to the broker
    # Per run of the job: the training state it resumes from after a requeue (see workers/journal.py).
    resume_state: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    @property
    def report_url(self) -> str | None:
        return f"/v1/jobs/{self.id}/report" if self.report is not None else None


class JobEvent(Base):
    __tablename__ = "job_events"
    __table_args__ = (Index("ix_job_events_job_pk", "job_id", "pk"),)

    pk: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(64), unique=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    type: Mapped[str] = mapped_column(String(16))
    level: Mapped[str] = mapped_column(String(16))
    message: Mapped[str] = mapped_column(Text)
    data: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class Checkpoint(Base):
    __tablename__ = "checkpoints"
    __table_args__ = (Index("ix_checkpoints_job_pk", "job_id", "pk"),)

    pk: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(64), unique=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    project_id: Mapped[str] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"), index=True)
    epoch: Mapped[int] = mapped_column(Integer)
    step: Mapped[int] = mapped_column(Integer)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict)
    bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    path: Mapped[str] = mapped_column(String(500))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
