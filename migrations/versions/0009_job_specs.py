"""Every job keeps its kind's typed, versioned spec (graft/jobspec.py, version 1), which the worker reads;
existing rows get theirs from their columns, each input under its own name (an adapt job's source, a
distill job's teacher, an evaluate job's model and dataset).

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-03
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSON = sa.JSON().with_variant(JSONB(), "postgresql")
# The backbone an adapt or distill job chose, from the training method it meant.
BACKBONE_OF_METHOD = {"linear_probe": "frozen", "partial": "partial", "full": "full"}


def spec_of_row(row: Any) -> dict[str, Any]:
    """Version 1 of the spec of a job stored before specs, from its columns (frozen here: later changes to
    graft/jobspec.py are new versions with their own migration)."""
    hyperparameters = dict(row.hyperparameters or {})
    if row.type == "evaluate":
        return {"version": 1, "kind": "evaluate", "model": row.base_model, "dataset": row.validation_dataset}
    if row.type == "adapt":
        method = row.method or "full"
        return {
            "version": 1,
            "kind": "adapt",
            "base_model": row.base_model,
            "source_dataset": row.training_dataset,
            "target_dataset": row.target_dataset,
            "evaluation_dataset": row.evaluation_dataset,
            "backbone": BACKBONE_OF_METHOD.get(method, "full"),
            "method": method,
            "methods": list(row.methods or []),
            "seeds": row.seeds,
            "hyperparameters": hyperparameters,
        }
    if row.type == "distill":
        method = row.method or "full"
        return {
            "version": 1,
            "kind": "distill",
            "teacher": row.base_model,
            "student": dict(row.student or {}),
            "training_dataset": row.training_dataset,
            "evaluation_dataset": row.evaluation_dataset,
            "backbone": BACKBONE_OF_METHOD.get(method, "full"),
            "method": method,
            "hyperparameters": hyperparameters,
        }
    return {
        "version": 1,
        "kind": row.type,
        "base_model": row.base_model,
        "from_checkpoint": row.from_checkpoint,
        "initialization": row.initialization,
        "method": row.method or "full",
        "training_dataset": row.training_dataset,
        "validation_dataset": row.validation_dataset,
        "evaluation_dataset": row.evaluation_dataset,
        "unlabeled_dataset": row.unlabeled_dataset,
        "head": row.head,
        "baseline": bool(row.baseline),
        "baseline_arms": row.baseline_arms,
        "seeds": row.seeds,
        "hyperparameters": hyperparameters,
    }


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("spec", JSON, nullable=True))
    jobs = sa.table(
        "jobs",
        *(
            sa.column(name, JSON if name in ("hyperparameters", "methods", "student", "baseline_arms", "seeds", "spec") else None)
            for name in (
                "pk", "type", "base_model", "training_dataset", "validation_dataset", "target_dataset",
                "evaluation_dataset", "unlabeled_dataset", "methods", "student", "method", "hyperparameters",
                "head", "initialization", "from_checkpoint", "baseline", "baseline_arms", "seeds", "spec",
            )
        ),
    )  # fmt: skip
    connection = op.get_bind()
    rows = connection.execute(sa.select(jobs)).all()
    for row in rows:
        connection.execute(jobs.update().where(jobs.c.pk == row.pk).values(spec=spec_of_row(row)))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("spec")
