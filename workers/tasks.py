"""Celery tasks: thin wrappers that pass a job id to the runner, and the worker's lifecycle hooks."""

from __future__ import annotations

import logging
import os
import socket
from typing import Any

from celery import shared_task
from celery.signals import celeryd_init, worker_process_init, worker_shutdown, worker_shutting_down

from graft.queueing import RUN_JOB

log = logging.getLogger("graft.worker")

# Jobs this worker asked to go back to the queue while it shuts down (main process).
_released: list[str] = []


@celeryd_init.connect
def name_this_worker(**_: Any) -> None:
    """The worker's name in job leases (host and main pid), inherited by the pool processes it forks."""
    os.environ["GRAFT_WORKER_NODE"] = f"{socket.gethostname()}:{os.getpid()}"


@worker_process_init.connect
def warm_up(**_: Any) -> None:
    """Pay the one-time costs when a worker process starts, not in its first job: importing the runner
    (torch with it) and the optimiser's first construction (which imports torch's compiler stack)."""
    import torch

    from workers import runner  # noqa: F401

    torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))])


@worker_shutting_down.connect
def release_running_jobs(**_: Any) -> None:
    """SIGTERM (or Ctrl-C) on the worker: its running jobs are asked to save their training state and go
    back to the queue, instead of the shutdown waiting for hours of training. Celery waits for them to do
    so (within a few steps) before it exits."""
    from graft import job_store
    from graft.config import get_settings
    from graft.db import make_engine, make_session_factory, session_scope

    node = os.environ.get("GRAFT_WORKER_NODE")
    if not node:
        return
    engine = make_engine(get_settings().effective_database_url, pool_size=1)
    try:
        with session_scope(make_session_factory(engine)) as session:
            released = job_store.request_release(session, f"{node}/")
        if released:
            _released.extend(released)
            log.warning("shutting down: jobs %s save their state and go back to the queue", released)
    except Exception:
        log.exception("could not ask the running jobs to go back to the queue")
    finally:
        engine.dispose()


@worker_shutdown.connect
def resend_released_jobs(**_: Any) -> None:
    """Once this worker has stopped consuming, send the jobs it released to the queue again, for the next
    worker. (Should this never run, a killed worker say, the reaper sends them after redispatch_seconds.)"""
    if not _released:
        return
    from graft import job_store
    from graft.config import get_settings
    from graft.db import make_engine, make_session_factory, session_scope
    from graft.queueing import JobQueue

    settings = get_settings()
    engine = make_engine(settings.effective_database_url, pool_size=1)
    try:
        with session_scope(make_session_factory(engine)) as session:
            queued = job_store.still_queued(session, _released)
    except Exception:
        log.exception("could not read the released jobs; the reaper will send them again")
        return
    finally:
        engine.dispose()
    queue = JobQueue(settings)
    for job_id in queued:
        queue.send(job_id)
    log.warning("sent the released jobs %s back to the queue", queued)


@shared_task(name=RUN_JOB, ignore_result=True, acks_late=True)
def run_job(job_id: str) -> None:
    from workers.runner import execute_job

    execute_job(job_id)
