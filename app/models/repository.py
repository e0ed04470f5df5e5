"""All SQL of registered models."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from graft.tables import Model


def get(session: Session, project_id: str, model_id: str) -> Model | None:
    return session.scalar(select(Model).where(Model.id == model_id, Model.project_id == project_id))


def add(session: Session, row: Model) -> None:
    session.add(row)
    session.flush()
