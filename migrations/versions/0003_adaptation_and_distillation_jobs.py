"""Adaptation and distillation jobs: target and evaluation datasets, adaptation methods, the student.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-28
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def upgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("target_dataset", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("evaluation_dataset", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("methods", JSON, nullable=True))
        batch_op.add_column(sa.Column("student", JSON, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_column("student")
        batch_op.drop_column("methods")
        batch_op.drop_column("evaluation_dataset")
        batch_op.drop_column("target_dataset")
