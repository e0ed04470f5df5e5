"""Cursor pagination: `{"object": "list", "data": [...], "has_more"}` with `limit` and `after`."""

from __future__ import annotations

from typing import Annotated, Any, Generic, Literal, TypeVar

from fastapi import Query
from pydantic import BaseModel
from sqlalchemy import ColumnElement, select
from sqlalchemy.orm import Session

from app.core.errors import InvalidRequest

T = TypeVar("T")

LimitQuery = Annotated[int, Query(ge=1, le=100, description="How many objects to return (1-100).")]
AfterQuery = Annotated[
    str | None, Query(max_length=64, description="Cursor: the id of the last object of the previous page.")
]


class ListResponse(BaseModel, Generic[T]):
    object: Literal["list"] = "list"
    data: list[T]
    has_more: bool


def paginate(
    session: Session,
    model: Any,
    where: list[ColumnElement[bool]],
    *,
    after: str | None,
    limit: int,
    ascending: bool = False,
) -> tuple[list[Any], bool]:
    """One page of `model` rows matching `where`, newest first unless `ascending`."""
    stmt = select(model).where(*where)
    if after:
        cursor = session.scalar(select(model.pk).where(model.id == after, *where))
        if cursor is None:
            raise InvalidRequest(f"'{after}' is not an id in this list", param="after", code="invalid_cursor")
        stmt = stmt.where(model.pk > cursor if ascending else model.pk < cursor)
    stmt = stmt.order_by(model.pk.asc() if ascending else model.pk.desc()).limit(limit + 1)
    rows = list(session.scalars(stmt))
    return rows[:limit], len(rows) > limit
