"""What job-status polling answers, read with the async reader: one statement per request, no thread."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from app.core.errors import InvalidRequest, not_found
from app.core.reads import Reader
from app.core.security import Principal
from app.jobs.schemas import JobEventOut, JobOut, JobSummary
from graft import job_store


def _values(row: Mapping[str, Any]) -> dict[str, Any]:
    values = dict(row)
    values["report_url"] = f"/v1/jobs/{values['id']}/report" if values.pop("has_report") else None
    return values


def job_out(row: Mapping[str, Any]) -> JobOut:
    return JobOut.model_validate(_values(row))


async def get_job(reader: Reader, principal: Principal, job_id: str) -> JobOut:
    row = await reader.one(job_store.JOB_BY_ID, {"job_id": job_id, "project_id": principal.project_id})
    if row is None:
        raise not_found("job", job_id)
    return job_out(row)


def _invalid_cursor(after: str) -> InvalidRequest:
    return InvalidRequest(f"'{after}' is not an id in this list", param="after", code="invalid_cursor")


async def list_jobs(
    reader: Reader, principal: Principal, *, status: str | None, after: str | None, limit: int
) -> tuple[list[JobSummary], bool]:
    """One page, newest first, and whether there is more."""
    params: dict[str, Any] = {"project_id": principal.project_id, "limit": limit + 1}
    if status is not None:
        params["status"] = status
    if after:
        params["after"] = after
    rows = await reader.all(job_store.JOBS_PAGE[(status is not None, bool(after))], params)
    if after and not rows:
        # An empty page after a cursor: the cursor was the last job, or it is no job of this list.
        params.pop("limit")
        if await reader.one(job_store.JOB_CURSOR[status is not None], params) is None:
            raise _invalid_cursor(after)
    return [JobSummary.model_validate(_values(row)) for row in rows[:limit]], len(rows) > limit


async def list_events(
    reader: Reader, principal: Principal, job_id: str, *, after: str | None, limit: int
) -> tuple[list[JobEventOut], bool]:
    """One page of a job's events, oldest first."""
    params: dict[str, Any] = {"job_id": job_id, "project_id": principal.project_id, "limit": limit + 1}
    if after:
        params["after"] = after
    rows = await reader.all(job_store.EVENTS_PAGE[bool(after)], params)
    if not rows:
        exists = await reader.one(
            job_store.JOB_EXISTS, {"job_id": job_id, "project_id": principal.project_id}
        )
        if exists is None:
            raise not_found("job", job_id)
        if after and await reader.one(job_store.EVENT_EXISTS, {"after": after, "job_id": job_id}) is None:
            raise _invalid_cursor(after)
    return [JobEventOut.model_validate(row) for row in rows[:limit]], len(rows) > limit
