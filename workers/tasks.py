"""Celery tasks: thin wrappers that pass a job id to the runner."""

from __future__ import annotations

from typing import Any

from celery import shared_task
from celery.signals import worker_process_init

from workers.queueing import RUN_JOB


@worker_process_init.connect
def warm_up(**_: Any) -> None:
    """Pay the one-time costs when a worker process starts, not in its first job: importing the runner
    (torch with it) and the optimiser's first construction (which imports torch's compiler stack)."""
    import torch

    from workers import runner  # noqa: F401

    torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))])


@shared_task(name=RUN_JOB, ignore_result=True, acks_late=True)
def run_job(job_id: str) -> None:
    from workers.runner import execute_job

    execute_job(job_id)
