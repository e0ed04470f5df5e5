"""Sending jobs to workers. Only the job id travels; it is sent after the job row is committed."""

from __future__ import annotations

import logging
import os

from kombu.exceptions import KombuError

from app.core.config import Settings
from workers.queueing import RUN_JOB, make_celery

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
