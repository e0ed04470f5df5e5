"""The anchors bench.api measures Graft's job endpoints against: a bare FastAPI app, one uvicorn worker.

- `GET /jobs/{id}`: one asyncpg `SELECT` of the columns Graft's job response (`JobOut`) has, `WHERE id=$1
  AND project_id=$2`, returned in the same JSON shape (JSON columns decoded, ISO 8601 UTC datetimes,
  `report_url` from `report IS NOT NULL`, so the report itself is never read). The fair "same row shape"
  anchor: what a careful hand-written endpoint over the same table does. The dict it builds holds plain JSON
  types already, so it goes straight into a `JSONResponse` (stdlib `json.dumps`), without FastAPI's
  `jsonable_encoder` pass over a returned dict (which costs more than building the dict).
- `GET /jobs?limit=20`: the project's newest `limit` jobs the same way (Graft's list page, `has_more` from
  one extra row).
- `GET /static`: a constant JSON body the size of a job response, built once: the framework's ceiling.
- `GET /healthz`: what bench.api probes after each run to see that the server still answers.

Configured by the environment bench.api sets:

- BENCH_ANCHOR_DSN: a PostgreSQL DSN (`postgresql://...`); without it the /jobs endpoints are absent;
- BENCH_ANCHOR_PROJECT: the project whose jobs the /jobs endpoints read;
- BENCH_ANCHOR_STATIC: the file whose bytes /static returns;
- BENCH_ANCHOR_POOL_MIN / BENCH_ANCHOR_POOL_MAX: the asyncpg pool (default 5 / 10, the ceiling of Graft's
  SQLAlchemy pool: pool_size 5 + max_overflow 5).

    .venv/bin/python -m uvicorn bench.api_anchors:app --host 127.0.0.1 --port 8001 --no-access-log
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Query, Request, Response
from fastapi.responses import JSONResponse

POOL_MIN = int(os.environ.get("BENCH_ANCHOR_POOL_MIN", "5"))
POOL_MAX = int(os.environ.get("BENCH_ANCHOR_POOL_MAX", "10"))

# The columns of a job response, in `JobOut`'s order; `report_url` is derived from `has_report`.
JOB_COLUMNS = (
    "id, project_id, type, status, base_model, training_dataset, validation_dataset, target_dataset, "
    "evaluation_dataset, methods, student, method, hyperparameters, head, initialization, from_checkpoint, "
    "baseline, seeds, transfer, best_checkpoint, (report IS NOT NULL) AS has_report, seed, metadata, "
    "progress, metrics, error, result_model, cancel_requested, attempts, worker_losses, created_at, "
    "started_at, finished_at"
)
# A job with the plan of its runs, as Graft's job GET; its list page leaves plans out.
GET_JOB = f"SELECT {JOB_COLUMNS}, plan FROM jobs WHERE id = $1 AND project_id = $2"
LIST_JOBS = f"SELECT {JOB_COLUMNS} FROM jobs WHERE project_id = $1 ORDER BY pk DESC LIMIT $2"


def iso(value: datetime | None) -> str | None:
    """As pydantic writes an aware datetime: ISO 8601, `Z` for UTC."""
    if value is None:
        return None
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")


def job_view(row: Mapping[str, Any]) -> dict[str, Any]:
    """A job row (JSON columns decoded, `has_report` instead of the report) as Graft's job response."""
    return {
        "object": "job",
        "id": row["id"],
        "project_id": row["project_id"],
        "type": row["type"],
        "status": row["status"],
        "base_model": row["base_model"],
        "training_dataset": row["training_dataset"],
        "validation_dataset": row["validation_dataset"],
        "target_dataset": row["target_dataset"],
        "evaluation_dataset": row["evaluation_dataset"],
        "methods": row["methods"],
        "student": row["student"],
        "method": row["method"],
        "hyperparameters": row["hyperparameters"],
        **({"plan": row["plan"]} if "plan" in row else {}),
        "head": row["head"],
        "initialization": row["initialization"],
        "from_checkpoint": row["from_checkpoint"],
        "baseline": row["baseline"],
        "seeds": row["seeds"],
        "transfer": row["transfer"],
        "best_checkpoint": row["best_checkpoint"],
        "report_url": f"/v1/jobs/{row['id']}/report" if row["has_report"] else None,
        "seed": row["seed"],
        "metadata": row["metadata"],
        "progress": row["progress"],
        "metrics": row["metrics"],
        "error": row["error"],
        "result_model": row["result_model"],
        "cancel_requested": row["cancel_requested"],
        "attempts": row["attempts"],
        "worker_losses": row["worker_losses"],
        "created_at": iso(row["created_at"]),
        "started_at": iso(row["started_at"]),
        "finished_at": iso(row["finished_at"]),
    }


def not_found(job_id: str) -> JSONResponse:
    message = f"No job '{job_id}' in this project"
    return JSONResponse({"error": {"code": "not_found", "message": message, "param": "job_id"}}, 404)


async def _decode_json(connection: Any) -> None:
    for name in ("json", "jsonb"):
        await connection.set_type_codec(name, encoder=json.dumps, decoder=json.loads, schema="pg_catalog")


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    static = os.environ.get("BENCH_ANCHOR_STATIC")
    app.state.static = Path(static).read_bytes() if static else b'{"object": "job"}'
    app.state.project = os.environ.get("BENCH_ANCHOR_PROJECT", "")
    dsn = os.environ.get("BENCH_ANCHOR_DSN")
    app.state.pool = None
    if dsn:
        import asyncpg

        app.state.pool = await asyncpg.create_pool(
            dsn, min_size=POOL_MIN, max_size=POOL_MAX, init=_decode_json
        )
    try:
        yield
    finally:
        if app.state.pool is not None:
            await app.state.pool.close()


app = FastAPI(title="bench.api anchors", lifespan=lifespan)


@app.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@app.get("/static")
async def static(request: Request) -> Response:
    return Response(request.app.state.static, media_type="application/json")


@app.get("/jobs/{job_id}")
async def get_job(job_id: str, request: Request) -> JSONResponse:
    row = await request.app.state.pool.fetchrow(GET_JOB, job_id, request.app.state.project)
    if row is None:
        return not_found(job_id)
    return JSONResponse(job_view(row))


@app.get("/jobs")
async def list_jobs(request: Request, limit: int = Query(default=20, ge=1, le=100)) -> JSONResponse:
    rows = await request.app.state.pool.fetch(LIST_JOBS, request.app.state.project, limit + 1)
    data = [job_view(row) for row in rows[:limit]]
    return JSONResponse({"object": "list", "data": data, "has_more": len(rows) > limit})
