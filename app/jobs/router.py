from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Header, Query, Request, Response, status
from fastapi.responses import FileResponse
from pydantic import TypeAdapter
from sqlalchemy.orm import Session

from app.core.deps import ContextDep, PrincipalDep, ServiceContext, caller
from app.core.errors import ERROR_RESPONSES, ErrorResponse
from app.core.pagination import AfterQuery, LimitQuery, ListResponse, paginate
from app.core.responses import model_response
from app.core.security import Principal
from app.jobs import service, views
from app.jobs.schemas import (
    JOB_CREATE_DESCRIPTION,
    CheckpointOut,
    JobCreate,
    JobEventOut,
    JobOut,
    JobReport,
    JobStatus,
    JobSummary,
)
from graft.storage import Storage
from graft.tables import Checkpoint, Job

router = APIRouter(prefix="/v1/jobs", tags=["jobs"], responses=ERROR_RESPONSES)
checkpoints_router = APIRouter(prefix="/v1/checkpoints", tags=["jobs"], responses=ERROR_RESPONSES)

IdempotencyKey = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        max_length=255,
        description="Retry-safe creation: the same key and body return the first job; a different body is a 409.",
    ),
]


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=JobOut,
    summary="Create a job: finetune, pretrain, adapt or distill",
    description=JOB_CREATE_DESCRIPTION,
    responses={
        200: {"model": JobOut, "description": "Replay of an earlier request with the same Idempotency-Key"},
        409: {"model": ErrorResponse, "description": "Idempotency-Key reused with a different body"},
    },
)
async def create_job(
    body: JobCreate,
    response: Response,
    context: ContextDep,
    principal: PrincipalDep,
    idempotency_key: IdempotencyKey = None,
) -> Job:
    # One short unit of work: the checks read a few rows, the job and its first event are written, and the
    # job id goes to the broker once the row is committed.
    job, created = await context.db.write(
        service.create_job,
        context.storage,
        context.queue,
        principal,
        body,
        idempotency_key,
        max_epoch_passes=context.settings.max_epoch_passes,
        max_optimizer_steps=context.settings.max_optimizer_steps,
        max_compute_hours=context.settings.max_job_hours,
    )
    if not created:
        response.status_code = status.HTTP_200_OK
    return job


@router.get(
    "",
    response_model=ListResponse[JobSummary],
    summary="List jobs, newest first (each without its plan: GET /v1/jobs/{id} has it)",
)
async def list_jobs(
    request: Request,
    status: Annotated[JobStatus | None, Query(description="Only jobs in this status.")] = None,
    limit: LimitQuery = 20,
    after: AfterQuery = None,
) -> Response:
    context, principal = caller(request)
    rows, has_more = await views.list_jobs(context.reader, principal, status=status, after=after, limit=limit)
    return model_response(ListResponse[JobSummary](data=rows, has_more=has_more))


@router.get("/{job_id}", response_model=JobOut, summary="Get a job (poll this for status and progress)")
async def get_job(job_id: str, request: Request) -> Response:
    context, principal = caller(request)
    return model_response(await views.get_job(context.reader, principal, job_id))


@router.post(
    "/{job_id}/cancel",
    response_model=JobOut,
    summary="Cancel a job",
    responses={409: {"model": ErrorResponse, "description": "The job already finished"}},
)
async def cancel_job(job_id: str, context: ContextDep, principal: PrincipalDep) -> Job:
    return await context.db.write(service.cancel_job, principal, job_id)


@router.get(
    "/{job_id}/events", response_model=ListResponse[JobEventOut], summary="A job's events, oldest first"
)
async def list_events(
    job_id: str, request: Request, limit: LimitQuery = 20, after: AfterQuery = None
) -> Response:
    context, principal = caller(request)
    rows, has_more = await views.list_events(context.reader, principal, job_id, after=after, limit=limit)
    return model_response(ListResponse[JobEventOut](data=rows, has_more=has_more))


@router.get(
    "/{job_id}/checkpoints",
    response_model=ListResponse[CheckpointOut],
    summary="A job's checkpoints, one per epoch",
)
async def list_checkpoints(
    job_id: str,
    context: ContextDep,
    principal: PrincipalDep,
    limit: LimitQuery = 20,
    after: AfterQuery = None,
) -> Response:
    def page(session: Session) -> dict[str, object]:
        job = service.get_job(session, principal, job_id)
        rows, has_more = paginate(
            session, Checkpoint, [Checkpoint.job_id == job.id], after=after, limit=limit, ascending=True
        )
        return {"data": [_checkpoint_view(row, job) for row in rows], "has_more": has_more}

    return await context.read_json(ListResponse[CheckpointOut], page)


def _checkpoint_view(row: Checkpoint, job: Job) -> dict[str, Any]:
    return {**CheckpointOut.model_validate(row).model_dump(), "best": row.id == job.best_checkpoint}


@router.get(
    "/{job_id}/report",
    summary="A job's report: what the transfer gained (JSON, or ?format=png)",
    description=(
        "Once the job succeeded. `kind` says which report it is.\n\n"
        "- `transfer` (finetune jobs created with `baseline: true`): validation metrics of the "
        "transferred model and of the same architecture trained from scratch on the same data and budget "
        "(per seed, mean and spread), the transfer gain, a negative-transfer flag (worse than scratch beyond "
        "the spread), the convergence speed-up, the train/validation gap of each, per-class accuracy, confusion "
        "matrices and learning curves.\n"
        "- `adaptation` (adapt jobs): per method beside source_only, target accuracy and macro-F1 when an "
        "evaluation dataset has labels, and always the label-free diagnostics (prediction entropy, class balance "
        "of target predictions, A-distance and MMD between the domains), mean and spread over seeds.\n"
        "- `distillation` (distill jobs): teacher, student trained alone and distilled student: accuracy, "
        "agreement with the teacher, parameters, checkpoint size, CPU latency, and the share of the gap "
        "recovered.\n\n"
        "`?format=png` draws the report's curves and comparisons."
    ),
    response_model=JobReport,
    responses={200: {"content": {"image/png": {}}}},
)
async def get_report(
    job_id: str,
    context: ContextDep,
    principal: PrincipalDep,
    request: Request,
    format: Annotated[Literal["json", "png"], Query(description="json (default) or png")] = "json",
) -> Any:
    if format == "png":
        return Response(await _report_picture(context, request, principal, job_id), media_type="image/png")

    def read(session: Session) -> dict[str, Any]:
        return service.report_of(service.get_job(session, principal, job_id))

    # A report can be megabytes (the confusion matrices of a thousand classes): serialised on a thread.
    return await context.read_json(REPORT, read)


async def _report_picture(
    context: ServiceContext, request: Request, principal: Principal, job_id: str
) -> bytes:
    """The report's picture, drawn once and kept (a report never changes once its job has succeeded): the
    first request draws it on the drawing lane, stopping if its client leaves; requests for the same
    picture meanwhile wait for that drawing, and later ones read the kept file."""
    job = await views.get_job(context.reader, principal, job_id)
    if job.report_url is None:
        raise service.no_report(job.type, job.status, job.baseline)
    key = report_picture_key(job.id)
    async with context.once_at_a_time(key):
        kept = await context.blocking(_read_kept, context.storage, key)
        if kept is not None:
            return kept
        report = await context.db.read(
            lambda session: service.report_of(service.get_job(session, principal, job_id))
        )
        from graft.report import render_png

        picture = await context.compute_while_connected(
            request, render_png, report, lane=context.draw_limiter
        )
        await context.blocking(_keep, context.storage, key, picture)
        return picture


REPORT: TypeAdapter[Any] = TypeAdapter(JobReport)


def report_picture_key(job_id: str) -> str:
    return f"reports/{job_id}.png"


def _read_kept(storage: Storage, key: str) -> bytes | None:
    path = storage.path(key)
    return path.read_bytes() if path.is_file() else None


def _keep(storage: Storage, key: str, data: bytes) -> None:
    with storage.atomic_path(key) as temp:
        temp.write_bytes(data)


def _checkpoint_and_job(session: Session, principal: Principal, checkpoint_id: str) -> tuple[Checkpoint, Job]:
    row = service.get_checkpoint(session, principal, checkpoint_id)
    return row, service.get_job(session, principal, row.job_id)


@checkpoints_router.get("/{checkpoint_id}", response_model=CheckpointOut, summary="Get a checkpoint")
async def get_checkpoint(checkpoint_id: str, context: ContextDep, principal: PrincipalDep) -> dict[str, Any]:
    row, job = await context.db.read(_checkpoint_and_job, principal, checkpoint_id)
    return _checkpoint_view(row, job)


@checkpoints_router.get(
    "/{checkpoint_id}/content",
    summary="Download a checkpoint (safetensors)",
    description=(
        "The tensors the job trained up to that epoch (`head.*` for linear_probe, every tensor for full), "
        "with the model spec and epoch in the safetensors metadata."
    ),
    response_class=FileResponse,
    responses={200: {"content": {"application/octet-stream": {}}, "description": "A safetensors file"}},
)
async def get_checkpoint_content(
    checkpoint_id: str, context: ContextDep, principal: PrincipalDep
) -> FileResponse:
    row = await context.db.read(service.get_checkpoint, principal, checkpoint_id)
    return FileResponse(
        context.storage.existing(row.path, f"the file of checkpoint {row.id}"),
        media_type="application/octet-stream",
        filename=f"{row.id}.safetensors",
    )
