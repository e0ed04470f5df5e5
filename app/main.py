"""The FastAPI application: `uvicorn app.main:app`, or `create_app(settings)` in tests."""

from __future__ import annotations

import gc
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from app import __version__, health
from app.core.auth import Authenticator, AuthMiddleware, KeyCache
from app.core.deps import SECURITY_SCHEME, ServiceContext
from app.core.errors import CatchAll, install_error_handlers
from app.core.limits import RequestGuard
from app.core.ratelimit import make_limiter
from app.core.reads import make_reader
from app.datasets import router as datasets
from app.datasets.service import archive_limits
from app.jobs import router as jobs
from app.jobs.reaper import Reaper
from app.models import router as models
from app.models.serving import ModelServer, ServingLimits
from app.projects import router as projects
from app.transferability import router as transferability
from app.uploads import router as uploads
from graft.config import Settings, get_settings
from graft.db import Database, make_engine
from graft.queueing import JobQueue
from graft.storage import Storage

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
        url = settings.effective_database_url
        engine = make_engine(url, pool_size=settings.db_pool_size)
        storage = Storage(settings.storage_dir)
        database = Database(engine)
        reader = make_reader(url, engine, pool_size=settings.db_reader_pool_size)
        queue = JobQueue(settings)
        limiter = make_limiter(settings)
        app.state.context = ServiceContext(
            settings=settings,
            db=database,
            reader=reader,
            storage=storage,
            queue=queue,
            model_server=ModelServer(
                storage,
                settings.model_cache_size,
                archive_limits(settings),
                ServingLimits(
                    max_text_chars=settings.max_text_chars,
                    max_predict_chars=settings.max_predict_chars,
                    max_predict_pixels=settings.max_predict_pixels,
                ),
                max_bytes=settings.model_cache_bytes,
            ),
            authenticator=Authenticator(
                reader=reader,
                cache=KeyCache(settings.key_cache_seconds),
                limiter=limiter,
                rate_limit_per_minute=settings.rate_limit_per_minute,
            ),
            compute_limiter=anyio.CapacityLimiter(settings.compute_concurrency),
            predict_limiter=anyio.CapacityLimiter(settings.predict_concurrency),
        )
        reaper = Reaper(settings, database.write_factory, queue, storage)
        reaper.start()
        # Everything loaded so far (the application, PyTorch and its kin: ~260k objects) lives as long as
        # the process: out of the collector's sight, a full collection no longer walks it, which was a
        # pause of ~130 ms every few thousand requests (most of job polling's p99).
        gc.collect()
        gc.freeze()
        try:
            yield
        finally:
            gc.unfreeze()  # what is freed at shutdown (tests start many apps in one process) is collectable again
            reaper.stop()
            await reader.close()
            await limiter.close()
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
    # Added innermost first. A request meets CORS (preflights need no key), then authentication (401 before
    # anything reads or even measures the body), then the guard (paths, queries, body caps), then the routes.
    app.add_middleware(
        RequestGuard,  # type: ignore[arg-type]
        max_body_bytes=settings.max_request_bytes,
        max_json_bytes=settings.max_json_bytes,
        streaming_routes={("POST", "/v1/datasets"), ("POST", "/v1/models"), ("PATCH", "/v1/uploads/{id}")},
    )
    app.add_middleware(AuthMiddleware)  # type: ignore[arg-type]
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
    # Outermost: an unexpected error becomes a 500 that leaves the client's connection usable.
    app.add_middleware(CatchAll)  # type: ignore[arg-type]
    # Job-status polling first: routes are matched in this order.
    for module in (jobs, datasets, uploads, models, transferability, projects, health):
        app.include_router(module.router)
    app.include_router(jobs.checkpoints_router)
    _document_security(app)
    return app


def _document_security(app: FastAPI) -> None:
    """Every /v1 operation needs the bearer key (checked by AuthMiddleware): say so in OpenAPI."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = build()
            schema.setdefault("components", {})["securitySchemes"] = SECURITY_SCHEME
            for path, item in schema.get("paths", {}).items():
                if path.startswith("/v1/"):
                    for operation in item.values():
                        operation["security"] = [{"HTTPBearer": []}]
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


app = create_app()
