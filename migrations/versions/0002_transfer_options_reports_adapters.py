"""Transfer options and reports on jobs (head, initialization, from_checkpoint, baseline, seeds, transfer,
report, best_checkpoint); evaluation jobs without a training dataset; LoRA adapters on models.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-27
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def upgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("head", sa.String(length=8), nullable=True))
        batch_op.add_column(sa.Column("initialization", sa.String(length=16), nullable=True))
        batch_op.add_column(sa.Column("from_checkpoint", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("baseline", sa.Boolean(), server_default=sa.false(), nullable=False))
        batch_op.add_column(sa.Column("seeds", JSON, nullable=True))
        batch_op.add_column(sa.Column("transfer", JSON, nullable=True))
        batch_op.add_column(sa.Column("report", JSON, nullable=True))
        batch_op.add_column(sa.Column("best_checkpoint", sa.String(length=64), nullable=True))
        batch_op.alter_column("training_dataset", existing_type=sa.VARCHAR(length=64), nullable=True)
        batch_op.alter_column("method", existing_type=sa.VARCHAR(length=32), nullable=True)

    with op.batch_alter_table("models", schema=None) as batch_op:
        batch_op.add_column(sa.Column("adapter_path", sa.String(length=500), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("models", schema=None) as batch_op:
        batch_op.drop_column("adapter_path")

    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.alter_column("method", existing_type=sa.VARCHAR(length=32), nullable=False)
        batch_op.alter_column("training_dataset", existing_type=sa.VARCHAR(length=64), nullable=False)
        batch_op.drop_column("best_checkpoint")
        batch_op.drop_column("report")
        batch_op.drop_column("transfer")
        batch_op.drop_column("seeds")
        batch_op.drop_column("baseline")
        batch_op.drop_column("from_checkpoint")
        batch_op.drop_column("initialization")
        batch_op.drop_column("head")
