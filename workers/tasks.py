"""Celery tasks: thin wrappers that pass a job id to the runner."""

from __future__ import annotations

from celery import shared_task

from workers.queueing import RUN_JOB


@shared_task(name=RUN_JOB, ignore_result=True, acks_late=True)
def run_job(job_id: str) -> None:
    from workers.runner import execute_job

    execute_job(job_id)
