"""Celery configuration shared by the API (which sends) and the worker (which consumes).

The broker carries only job ids; job state lives in the database.

Long training tasks: acks_late with prefetch 1, so a worker takes one job at a time and a job whose
worker died is delivered again (the runner makes every delivery after the first a no-op). JSON only.
Queues are per kind of worker (`GRAFT_WORKER_QUEUE`, default `gpu`).
"""

from __future__ import annotations

import logging
import os
from typing import Any

from celery import Celery
from kombu.exceptions import KombuError

from graft.config import Settings

RUN_JOB = "graft.run_job"


def transport_options(settings: Settings) -> dict[str, Any]:
    if settings.uses_filesystem_broker:
        folders = {name: settings.broker_dir / name for name in ("queue", "processed", "control")}
        for folder in folders.values():
            folder.mkdir(parents=True, exist_ok=True)
        return {
            "data_folder_in": str(folders["queue"]),
            "data_folder_out": str(folders["queue"]),
            "processed_folder": str(folders["processed"]),
            "control_folder": str(folders["control"]),
            "store_processed": False,
            # The folder is polled; a short interval keeps the wait for a new job short.
            "polling_interval": 0.1,
        }
    # Redis: a message not acknowledged within this time is delivered again. Training jobs run long,
    # and a second delivery of a job that is already running does nothing.
    return {"visibility_timeout": 24 * 3600, "socket_connect_timeout": 5, "socket_timeout": 30}


def make_celery(settings: Settings) -> Celery:
    celery = Celery("graft")
    celery.conf.update(
        broker_url=settings.effective_broker_url,
        broker_transport_options=transport_options(settings),
        broker_connection_retry_on_startup=True,
        broker_connection_timeout=5,
        task_serializer="json",
        accept_content=["json"],
        result_serializer="json",
        result_backend=None,
        task_ignore_result=True,
        task_acks_late=True,
        worker_prefetch_multiplier=1,
        # In KiB; checked after each job, so a job always finishes in the process that started it.
        worker_max_memory_per_child=settings.worker_max_memory_mb * 1024 or None,
        task_default_queue=settings.worker_queue,
        task_routes={RUN_JOB: {"queue": settings.worker_queue}},
        worker_hijack_root_logger=False,
        # The filesystem broker has no fan-out exchange for remote control; nothing in Graft needs it.
        worker_enable_remote_control=not settings.uses_filesystem_broker,
        imports=("workers.tasks",),
    )
    return celery


log = logging.getLogger("graft.queue")


class JobQueue:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.celery = make_celery(settings)

    def send(self, job_id: str) -> bool:
        """Send one job id; False when the broker refused it (the job stays queued in the database)."""
        try:
            self.celery.send_task(RUN_JOB, args=[job_id], queue=self.settings.worker_queue, retry=False)
        except (KombuError, OSError) as exc:
            log.error("could not send job %s to the broker: %s", job_id, exc)
            return False
        return True

    def pending(self) -> int | None:
        """Messages waiting in the broker's queue (not those a worker holds); None when it cannot tell."""
        try:
            if self.settings.uses_filesystem_broker:
                folder = self.settings.broker_dir / "queue"
                return sum(1 for entry in folder.iterdir() if entry.is_file()) if folder.exists() else 0
            url = self.settings.effective_broker_url
            if not url.startswith(("redis://", "rediss://")):
                return None
            import redis

            client = redis.Redis.from_url(url, socket_timeout=3, socket_connect_timeout=3)
            try:
                return int(client.llen(self.settings.worker_queue))  # type: ignore[arg-type]
            finally:
                client.close()
        except (OSError, ConnectionError) as exc:
            log.warning("could not count the broker's pending messages: %s", exc)
            return None
        except Exception as exc:  # redis errors
            log.warning("could not count the broker's pending messages: %s", exc)
            return None

    def ping(self, timeout: float = 3.0) -> None:
        """Raise when the broker cannot be reached."""
        if self.settings.uses_filesystem_broker:
            folder = self.settings.broker_dir / "queue"
            if not os.access(folder, os.W_OK):
                raise OSError(f"broker folder {folder} is not writable")
            return
        with self.celery.connection_for_write() as connection:
            connection.ensure_connection(max_retries=1, timeout=timeout)
