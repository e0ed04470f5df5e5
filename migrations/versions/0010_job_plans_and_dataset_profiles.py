"""Jobs keep the plan of their runs (graft/plan.py): the runs the API priced and the worker makes; datasets
keep a profile of what they hold (images' sizes, texts' mean length), which prices those runs.

Rows stored before have neither: the worker plans such a job from its spec when it starts, and a dataset
without a profile is priced from what its row has (its images' pixels).

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-08
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSON = sa.JSON().with_variant(JSONB(), "postgresql")


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("plan", JSON, nullable=True))
    with op.batch_alter_table("datasets") as batch:
        batch.add_column(sa.Column("profile", JSON, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("datasets") as batch:
        batch.drop_column("profile")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("plan")
