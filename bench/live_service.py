"""The real service for benchmarks: the API (uvicorn) and one Celery worker as processes on a fresh
embedded home (SQLite, filesystem broker), as `make run` starts them, driven over HTTP.

    with service(home, torch_threads=2) as svc:
        graft = Graft(svc.api)
        dataset = graft.upload(path, "image_classification")
        job = graft.job({"type": "pretrain", "base_model": "resnet-small", "training_dataset": dataset})
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from app.cli import api_command, prestart, worker_command
from bench.common import ROOT
from graft.config import Settings
from tests.helpers import Api, free_port, log_tail, stop

TERMINAL = ("succeeded", "failed", "cancelled")


@dataclass
class Service:
    api: Api
    worker_log: Path
    api_log: Path

    def logs(self) -> str:
        return f"--- api log ---\n{log_tail(self.api_log, 40)}\n--- worker log ---\n{log_tail(self.worker_log, 40)}"


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.2)


@contextmanager
def service(home: Path, torch_threads: int) -> Iterator[Service]:
    """The API and one worker on a fresh embedded home, default settings but for the home, port, queue,
    admin key and torch threads."""
    key = "graft_bench_admin_" + secrets.token_hex(16)
    settings = Settings(
        home=home,
        port=free_port(),
        worker_queue=f"bench-{secrets.token_hex(4)}",
        bootstrap_api_key=key,  # type: ignore[arg-type]
    )
    prestart(settings)
    env = {k: v for k, v in os.environ.items() if not k.startswith("GRAFT_")}
    env.update(
        {
            "GRAFT_HOME": str(settings.home),
            "GRAFT_PORT": str(settings.port),
            "GRAFT_WORKER_QUEUE": settings.worker_queue,
            "GRAFT_BOOTSTRAP_API_KEY": key,
            "GRAFT_TORCH_THREADS": str(torch_threads),
            "PYTHONUNBUFFERED": "1",
        }
    )
    api_log, worker_log = home / "api.log", home / "worker.log"
    with api_log.open("wb") as api_out, worker_log.open("wb") as worker_out:
        api = subprocess.Popen(
            api_command(settings), env=env, cwd=ROOT, stdout=api_out, stderr=subprocess.STDOUT
        )
        worker = subprocess.Popen(
            worker_command(settings), env=env, cwd=ROOT, stdout=worker_out, stderr=subprocess.STDOUT
        )
    http = httpx.Client(base_url=f"http://127.0.0.1:{settings.port}", timeout=120)
    running = Service(Api(http, key), worker_log, api_log)
    # A benchmark stopped with SIGTERM stops its service too (the finally below), leaving no process behind.
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    try:

        def ready() -> bool:
            if api.poll() is not None or worker.poll() is not None:
                raise RuntimeError(f"a service process exited\n{running.logs()}")
            try:
                return http.get("/readyz").status_code == 200 and b"ready." in worker_log.read_bytes()
            except httpx.HTTPError:
                return False

        wait_until(ready, 120, "the API and the worker")
        yield running
    finally:
        signal.signal(signal.SIGTERM, previous)
        http.close()
        stop(api, 60)
        stop(worker, 60)


class Graft:
    """A user's calls: upload files, run jobs to their end, evaluate models; every refusal or failure is
    raised with what the service said."""

    def __init__(self, svc: Service, poll: float = 1.0) -> None:
        self.svc = svc
        self.api = svc.api
        self.poll = poll

    def upload(self, path: Path, task: str, label_column: str | None = None) -> str:
        fields = {"label_column": label_column} if label_column else {}
        response = self.api.upload(path.read_bytes(), path.name, task, **fields)
        if response.status_code != 201:
            raise RuntimeError(f"upload of {path.name}: {response.status_code} {response.text}")
        return str(response.json()["id"])

    def wait(self, job_id: str) -> dict[str, Any]:
        while True:
            job: dict[str, Any] = self.api.get(f"/v1/jobs/{job_id}").json()
            if job["status"] in TERMINAL:
                if job["status"] != "succeeded":
                    raise RuntimeError(f"job {job_id} {job['status']}: {job['error']}\n{self.svc.logs()}")
                return job
            time.sleep(self.poll)

    def job(self, body: dict[str, Any]) -> dict[str, Any]:
        """Create a job (a finetune unless `type` says otherwise) and return it once it has succeeded."""
        response = self.api.create_job(body)
        if response.status_code != 201:
            raise RuntimeError(f"job {body}: {response.status_code} {response.text}")
        return self.wait(response.json()["id"])

    def report(self, job_id: str) -> dict[str, Any]:
        response = self.api.get(f"/v1/jobs/{job_id}/report")
        if response.status_code != 200:
            raise RuntimeError(f"report of {job_id}: {response.status_code} {response.text}")
        return response.json()  # type: ignore[no-any-return]

    def evaluate(self, model: str, dataset: str) -> dict[str, Any]:
        """POST /v1/models/{model}/evaluate: the answer, or the evaluation job's metrics once it is done."""
        response = self.api.post(f"/v1/models/{model}/evaluate", json={"dataset": dataset})
        if response.status_code == 200:
            return response.json()  # type: ignore[no-any-return]
        if response.status_code == 202:
            return self.wait(response.json()["id"])["metrics"]  # type: ignore[no-any-return]
        raise RuntimeError(f"evaluate {model} on {dataset}: {response.status_code} {response.text}")
