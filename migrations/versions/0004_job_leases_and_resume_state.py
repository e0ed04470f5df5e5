"""Durable jobs: a lease (owner, fencing token, heartbeat), a release request for graceful shutdown, when a
job was last sent to the broker, and the training state a requeued job resumes from.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-28
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def upgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("lease_owner", sa.String(length=255), nullable=True))
        batch_op.add_column(
            sa.Column("lease_token", sa.Integer(), nullable=False, server_default=sa.text("0"))
        )
        batch_op.add_column(sa.Column("heartbeat_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(
            sa.Column("release_requested", sa.Boolean(), nullable=False, server_default=sa.false())
        )
        batch_op.add_column(
            sa.Column("worker_losses", sa.Integer(), nullable=False, server_default=sa.text("0"))
        )
        batch_op.add_column(sa.Column("dispatched_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("resume_state", JSON, nullable=True))
        batch_op.create_index("ix_jobs_status_heartbeat_at", ["status", "heartbeat_at"])
    # Jobs running while this migration runs had no lease: they get a full lease period from now, after
    # which the reaper requeues them unless their worker finishes them first.
    op.execute(sa.text("UPDATE jobs SET heartbeat_at = CURRENT_TIMESTAMP WHERE status = 'running'"))


def downgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_index("ix_jobs_status_heartbeat_at")
        batch_op.drop_column("resume_state")
        batch_op.drop_column("dispatched_at")
        batch_op.drop_column("worker_losses")
        batch_op.drop_column("release_requested")
        batch_op.drop_column("heartbeat_at")
        batch_op.drop_column("lease_token")
        batch_op.drop_column("lease_owner")
