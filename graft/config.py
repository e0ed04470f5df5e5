"""The one settings class. Every value comes from a `GRAFT_*` environment variable or its default.

The defaults give the embedded single-machine setup: SQLite, Celery's filesystem broker and local
storage, all under `GRAFT_HOME`. Pointing `GRAFT_DATABASE_URL` at PostgreSQL and `GRAFT_BROKER_URL`
at Redis runs the same code as a cluster.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

GIB = 1024**3


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="GRAFT_", extra="ignore")

    home: Path = Field(default=Path("var"), description="Root of the embedded database, broker and storage.")
    database_url: str | None = Field(
        default=None, description="SQLAlchemy URL; SQLite under home when unset."
    )
    broker_url: str | None = Field(
        default=None, description="Celery broker URL; filesystem broker when unset."
    )
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=1, le=65535)
    max_upload_bytes: int = Field(default=2 * GIB, gt=0)
    # Every other request body (images to predict on); JSON bodies have a smaller cap of their own.
    max_request_bytes: int = Field(default=64 * 1024 * 1024, gt=0)
    max_json_bytes: int = Field(default=8 * 1024 * 1024, gt=0)
    bootstrap_api_key: SecretStr | None = Field(
        default=None, description="Admin key of the default project; generated when unset."
    )
    worker_queue: str = Field(default="gpu", min_length=1)
    worker_concurrency: int = Field(default=1, ge=1)
    # A worker's pool process keeps its peak memory after a large job (PyTorch's allocator and the data it
    # read); one whose resident memory passes this after a job is replaced by a fresh one (0: never).
    worker_max_memory_mb: int = Field(default=3072, ge=0)
    # Archive limits (zip bombs and file floods are rejected before anything is extracted).
    max_archive_members: int = Field(default=50_000, gt=0)
    max_archive_uncompressed_bytes: int = Field(default=8 * GIB, gt=0)
    max_compression_ratio: float = Field(default=200.0, gt=1)
    max_image_pixels: int = Field(default=40_000_000, gt=0)
    # Every image of one archive together: images are validated from their headers at upload, and this is
    # what training will decode.
    max_archive_pixels: int = Field(default=1_000_000_000, gt=0)
    # Labels (classes) and column names, at upload and at model import.
    max_classes: int = Field(default=1000, ge=2)
    max_class_chars: int = Field(default=200, ge=1)
    max_column_chars: int = Field(default=200, ge=1)
    # Serving: per request, at most this many inputs, characters of text (each input and all together;
    # a text model reads only its first max_length tokens anyway) and decoded image pixels.
    max_predict_inputs: int = Field(default=256, gt=0)
    max_text_chars: int = Field(default=20_000, gt=0)
    max_predict_chars: int = Field(default=1_000_000, gt=0)
    max_predict_pixels: int = Field(default=100_000_000, gt=0)
    # An evaluation is answered within the request when the model's measured cost per example says it
    # takes at most evaluate_sync_seconds (and the dataset has at most evaluate_sync_max_examples);
    # otherwise it becomes a job at once.
    evaluate_sync_max_examples: int = Field(default=2000, ge=0)
    evaluate_sync_seconds: float = Field(default=5.0, ge=0)
    model_cache_size: int = Field(default=4, ge=1)
    # Models kept loaded for prediction weigh at most this much together (the one in use always stays).
    model_cache_bytes: int = Field(default=1024**3, ge=0)
    # A model import's network: at most this many parameters (minilm-l6, the largest built-in, has 23 M).
    max_import_parameters: int = Field(default=64_000_000, ge=1)
    # Model inference, evaluation, report drawing and dataset validation in the API process run at most
    # this many at a time, beside (never in place of) the threads that answer everything else.
    compute_concurrency: int = Field(default=2, ge=1)
    # Predictions have threads of their own, as many at a time: never held up behind an evaluation.
    predict_concurrency: int = Field(default=2, ge=1)
    # A transferability ranking is answered only when its estimated cost (examples and pixels times the
    # models' measured cost) is at most this; a larger one gets a 422 saying how many examples would fit.
    rank_sync_seconds: float = Field(default=60.0, gt=0)
    # Database connections of one API process (the pool of short units of work; the async reader of
    # status polls and key lookups has its own, db_reader_pool_size).
    db_pool_size: int = Field(default=10, ge=1)
    db_reader_pool_size: int = Field(default=10, ge=1)
    # A key looked up once is trusted for this long without asking the database again; revoking a key
    # takes effect at once on the API process that revoked it and within this time on the others.
    key_cache_seconds: float = Field(default=10.0, ge=0)
    # Storage: a declared upload must fit in the free space (less what other unfinished uploads declared
    # and a reserve: min_free_bytes, or a twentieth of a smaller volume), and in the project's share when
    # project_storage_bytes is set (0: no share).
    min_free_bytes: int = Field(default=1024**3, ge=0)
    project_storage_bytes: int = Field(default=0, ge=0)
    # A job's training budget: passes over its data (epochs x seeds x the runs it makes, head warm-up
    # included) and optimiser steps in all.
    max_epoch_passes: int = Field(default=2000, ge=1)
    max_optimizer_steps: int = Field(default=2_000_000, ge=1)
    # And its estimated compute (graft/compute.py), in hours of the reference machine (2 CPU cores): every
    # pass of every network its runs make. A GPU worker runs a job many times faster: raise it there.
    max_job_hours: float = Field(default=24.0, gt=0)
    # Training: how often (seconds) a running job looks for a cancel request.
    cancel_poll_seconds: float = Field(default=1.0, gt=0)
    # Durable jobs: a worker renews its job's lease every heartbeat; a lease not renewed for lease_seconds
    # has expired, and the reaper (in every API process) sends the job to another worker, at most
    # max_attempts times in all. Queued jobs whose broker message was lost (a broker restarted without
    # persistence) are sent again after redispatch_seconds, when the broker's queue is empty.
    heartbeat_seconds: float = Field(default=5.0, gt=0)
    lease_seconds: float = Field(default=60.0, gt=0)
    max_attempts: int = Field(default=3, ge=1)
    reaper_interval_seconds: float = Field(default=10.0, ge=0, description="0 turns the reaper off.")
    redispatch_seconds: float = Field(default=120.0, gt=0)
    # Requests per API key per minute (429 with Retry-After beyond); 0 turns the limit off.
    rate_limit_per_minute: int = Field(default=1200, ge=0)
    # Origins allowed to call the API from a browser (CORS), comma-separated; none by default.
    cors_origins: str = Field(
        default="", description="e.g. https://app.example.com,https://admin.example.com"
    )
    # Resumable uploads that have not grown for this long are removed (and stray temporary files as old).
    upload_expiry_seconds: float = Field(default=24 * 3600, gt=0)
    # How long a worker keeps retrying a write while the database is unreachable.
    db_retry_seconds: float = Field(default=300.0, ge=0)
    torch_threads: int | None = Field(default=None, ge=1)

    @field_validator("home")
    @classmethod
    def _absolute_home(cls, value: Path) -> Path:
        return value.expanduser().resolve()

    @field_validator("bootstrap_api_key")
    @classmethod
    def _strong_bootstrap_key(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and len(value.get_secret_value()) < 16:
            raise ValueError("GRAFT_BOOTSTRAP_API_KEY must be at least 16 characters")
        return value

    @property
    def storage_dir(self) -> Path:
        return self.home / "storage"

    @property
    def broker_dir(self) -> Path:
        return self.home / "broker"

    @property
    def admin_key_file(self) -> Path:
        return self.home / "admin.key"

    @property
    def effective_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.home / 'graft.db'}"

    @property
    def effective_broker_url(self) -> str:
        return self.broker_url or "filesystem://"

    @property
    def uses_filesystem_broker(self) -> bool:
        return self.effective_broker_url.startswith("filesystem://")


@lru_cache
def get_settings() -> Settings:
    return Settings()
