"""All SQL of datasets."""

from __future__ import annotations

from sqlalchemy import exists, select
from sqlalchemy.orm import Session

from graft.tables import Dataset


def get(session: Session, project_id: str, dataset_id: str, *, for_update: bool = False) -> Dataset | None:
    """`for_update` locks the row: deleting a dataset and queueing a job on it never interleave."""
    stmt = select(Dataset).where(Dataset.id == dataset_id, Dataset.project_id == project_id)
    return session.scalar(stmt.with_for_update() if for_update else stmt)


def add(session: Session, row: Dataset) -> None:
    session.add(row)
    session.flush()


def delete(session: Session, row: Dataset) -> None:
    session.delete(row)
    session.flush()


def any_exist(session: Session, project_id: str) -> bool:
    return bool(session.scalar(select(exists().where(Dataset.project_id == project_id))))
