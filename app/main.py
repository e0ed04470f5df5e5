"""The FastAPI application: `uvicorn app.main:app`, or `create_app(settings)` in tests."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from app import __version__, health
from app.core.config import Settings, get_settings
from app.core.db import make_engine, make_session_factory
from app.core.deps import ServiceContext
from app.core.errors import install_error_handlers
from app.core.limits import RequestGuard
from app.core.queue import JobQueue
from app.core.ratelimit import make_limiter
from app.core.storage import Storage
from app.datasets import router as datasets
from app.datasets.service import archive_limits
from app.jobs import router as jobs
from app.jobs.reaper import Reaper
from app.models import router as models
from app.models.serving import ModelServer
from app.projects import router as projects
from app.transferability import router as transferability
from app.uploads import router as uploads

DESCRIPTION = """
Graft adapts pretrained (upstream) models to your own (downstream) task.

1. Upload a dataset: `POST /v1/datasets` (CSV/JSONL for text and tabular data, ZIP of images).
2. Pick a base model: `GET /v1/models` lists the built-in upstream models and your own.
3. Create a job: `POST /v1/jobs` with `{"type": "finetune", "base_model", "training_dataset", "method"}`;
   or `pretrain` (upstream, supervised or `self_supervised`), `adapt` (to an unlabelled target domain),
   `distill` (into a smaller student). `POST /v1/transferability` ranks candidate base models first.
4. Poll `GET /v1/jobs/{id}` (queued → running → succeeded | failed | cancelled), read its events and
   checkpoints, then predict with its `result_model`: `POST /v1/models/{id}/predict`.

Every `/v1` call needs `Authorization: Bearer <API key>`. Errors are `{"error": {"code", "message", "param"}}`.
Lists are `{"object": "list", "data": [...], "has_more"}`, paged with `limit` and `after`.
"""


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine = make_engine(settings.effective_database_url)
        storage = Storage(settings.storage_dir)
        session_factory = make_session_factory(engine)
        queue = JobQueue(settings)
        app.state.context = ServiceContext(
            settings=settings,
            engine=engine,
            session_factory=session_factory,
            storage=storage,
            queue=queue,
            model_server=ModelServer(storage, settings.model_cache_size, archive_limits(settings)),
            limiter=make_limiter(settings),
        )
        reaper = Reaper(settings, session_factory, queue, storage)
        reaper.start()
        try:
            yield
        finally:
            reaper.stop()
            engine.dispose()

    app = FastAPI(
        title="Graft",
        version=__version__,
        description=DESCRIPTION,
        lifespan=lifespan,
        openapi_tags=[
            {"name": "datasets", "description": "Upload and inspect training data."},
            {
                "name": "models",
                "description": "Built-in upstream models, your fine-tuned models, predictions.",
            },
            {
                "name": "jobs",
                "description": "Fine-tuning, pretraining, adaptation and distillation jobs, their events, "
                "checkpoints and reports.",
            },
            {"name": "projects", "description": "Projects and API keys."},
            {"name": "health", "description": "Liveness and readiness."},
        ],
    )
    install_error_handlers(app)
    origins = [origin.strip() for origin in settings.cors_origins.split(",") if origin.strip()]
    if origins:  # off unless configured: browsers on other origins get no access
        app.add_middleware(
            CORSMiddleware,
            allow_origins=origins,
            allow_methods=["GET", "POST", "PATCH", "DELETE"],
            allow_headers=[
                "Authorization",
                "Content-Type",
                "Idempotency-Key",
                "Upload-Offset",
                "Upload-Checksum",
            ],
            expose_headers=["Retry-After", "Upload-Offset"],
        )
    app.add_middleware(
        RequestGuard,  # type: ignore[arg-type]
        max_body_bytes=settings.max_request_bytes,
        streaming_routes={("POST", "/v1/datasets"), ("POST", "/v1/models"), ("PATCH", "/v1/uploads/{id}")},
    )
    for module in (datasets, uploads, models, jobs, transferability, projects, health):
        app.include_router(module.router)
    app.include_router(jobs.checkpoints_router)
    return app


app = create_app()
