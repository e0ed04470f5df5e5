"""Benchmark: job-status polling under load. Graft's `GET /v1/jobs/{id}` and its list page, run as
docker-compose runs the API (`python -m app.cli api`: one uvicorn worker), against bare FastAPI anchors on
the same machine in the same run (bench/api_anchors.py): one raw-asyncpg `SELECT` of the same columns in
the same JSON shape, and a constant JSON body of the same size (the framework's ceiling).

Per backend (PostgreSQL + Redis, embedded SQLite + filesystem broker), a fresh database migrated and
bootstrapped as the service does (`prestart`), then 10,000 realistic jobs of the bootstrap project and a
few hundred events, written directly with SQLAlchemy. Each server is its own process with one uvicorn
worker on its own port, started for one run alone (nothing else of the benchmark runs while wrk drives
it), waited for, warmed up, measured, stopped. Load: wrk, one thread, `Authorization: Bearer <key>`, a
random job id of the 10,000 per request; any non-2xx response or socket error (connect, read, write,
timeout at 10 s) counts as an error, and a run in which no response came for 2 s or more is a hang. At
50 connections, --runs rounds alternate the rows (one --duration run of each per round; medians and
per-round ratios reported); then Graft's job GET at 1 to 1,000 connections, a fresh server per level.

The benchmark reports; it does not assert: it exits non-zero only when the harness failed (a server that
did not start, wrk that did not finish). Results: printed as a markdown section, and written to
var/bench/api-<time>.json (and .md) with every server's log beside them.

    .venv/bin/python -m bench.api [--backend postgresql|sqlite|both] [--runs 3] [--duration 10]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import random
import re
import resource
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from importlib import metadata
from pathlib import Path
from typing import Any

from bench.api_anchors import POOL_MAX, POOL_MIN, job_view
from bench.common import ROOT, command_line, machine, markdown_table, median, write_section

NAME = "api"
OUT = ROOT / "var" / "bench"
POSTGRES = "postgresql+psycopg://postgres@127.0.0.1:5432"
REDIS = "redis://127.0.0.1:6379/0"
WRK = shutil.which("wrk") or "/usr/bin/wrk"
WRK_TIMEOUT_S = 10
STALL_S = 2.0  # no response on any connection for this long counts as a hang (a stall)
START_TIMEOUT_S = 120.0
START_ATTEMPTS = 2  # the API may be mid-edit: one more try after a pause
START_RETRY_PAUSE_S = 20.0
STOP_GRACE_S = 10.0
# Targets of the issue (reported, never asserted).
TARGET_GET_RATIO = 0.85
TARGET_GET_P99_MS = 50.0
TARGET_LIST_FACTOR = 2.0

STATUS_MIX = (("succeeded", 0.78), ("failed", 0.12), ("cancelled", 0.05), ("queued", 0.03), ("running", 0.02))
TYPE_MIX = (("finetune", 0.70), ("adapt", 0.12), ("pretrain", 0.08), ("distill", 0.08), ("evaluate", 0.02))


# ---------------------------------------------------------------- the machine


def versions() -> dict[str, str]:
    found = {}
    for name in (
        "fastapi",
        "starlette",
        "uvicorn",
        "uvloop",
        "httptools",
        "pydantic",
        "sqlalchemy",
        "psycopg",
        "asyncpg",
    ):
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "absent"
    return found


def postgres_version() -> str:
    try:
        import psycopg

        with psycopg.connect("postgresql://postgres@127.0.0.1:5432/postgres", connect_timeout=5) as conn:
            row = conn.execute("SHOW server_version").fetchone()
            return str(row[0]) if row else "unknown"
    except Exception as exc:
        return f"unreachable ({type(exc).__name__})"


def wrk_version() -> str:
    result = subprocess.run([WRK, "--version"], capture_output=True, text=True, check=False)
    first = (result.stdout + result.stderr).splitlines()
    return first[0].split(" Copyright")[0] if first else "unknown"


def graft_revision() -> str:
    """The commit measured, and whether the working tree under app/ differs from it (uncommitted work)."""

    def git(*args: str) -> str:
        result = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=False)
        return result.stdout.strip()

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    changed = [line for line in git("status", "--porcelain", "--", "app").splitlines() if line.strip()]
    return f"{commit}" + (f" with uncommitted changes to {len(changed)} files under app/" if changed else "")


def loadavg() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} / {five:.2f} / {fifteen:.2f}"


def raise_fd_limit(wanted: int = 65536) -> int:
    """wrk and the servers inherit this: 1,000 connections need well over 1,000 descriptors each side."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY:
        wanted = min(wanted, hard)
    if soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


# ---------------------------------------------------------------- realistic jobs

CLASSES = [
    ["negative", "positive"],
    ["benign", "malignant"],
    ["business", "politics", "sport", "tech", "world"],
    [str(d) for d in range(10)],
    ["cat", "dog", "fox", "horse", "owl", "rabbit", "deer", "wolf", "bear", "lynx", "boar", "hare"],
]
BASE_MODELS = {
    "finetune": ["minilm-l6", "cnn-small", "efficientnet-lite0", "resnet-tiny"],
    "pretrain": ["cnn-small", "minilm-l6"],
    "adapt": ["cnn-small", "efficientnet-lite0"],
    "distill": ["minilm-l6", "efficientnet-lite0"],
    "evaluate": ["minilm-l6", "cnn-small"],
}
ERRORS = [
    {"code": "invalid_dataset", "message": "row 1842: label 'neutral' is not one of the dataset's classes"},
    {
        "code": "out_of_memory",
        "message": "CUDA out of memory at batch size 256; retry with a smaller batch_size",
    },
    {"code": "worker_lost", "message": "The job lost its worker 3 times; GRAFT_MAX_ATTEMPTS is 3"},
    {"code": "diverged", "message": "train_loss became NaN at epoch 4 step 311; lower the learning_rate"},
]
ADAPT_METHODS = ["dann", "coral", "mmd", "adabn", "self_training"]


def _pick(rng: random.Random, mix: Sequence[tuple[str, float]]) -> str:
    return rng.choices([name for name, _ in mix], weights=[weight for _, weight in mix])[0]


def _token(rng: random.Random, prefix: str) -> str:
    return prefix + "_" + "".join(rng.choices("abcdefghijklmnopqrstuvwxyz234567", k=24))


def _curve(rng: random.Random, epochs: int, start: float) -> list[dict[str, float]]:
    rows, acc = [], start
    for epoch in range(1, epochs + 1):
        acc = min(0.99, acc + (0.95 - acc) * rng.uniform(0.05, 0.3))
        rows.append(
            {
                "epoch": float(epoch),
                "train_loss": round(rng.uniform(0.05, 1.5) / epoch**0.5, 6),
                "train_accuracy": round(min(0.999, acc + rng.uniform(0, 0.05)), 6),
                "val_loss": round(rng.uniform(0.1, 1.6) / epoch**0.4, 6),
                "val_accuracy": round(acc, 6),
            }
        )
    return rows


def _stat(rng: random.Random, n: int, low: float, high: float) -> dict[str, Any]:
    values = [round(rng.uniform(low, high), 6) for _ in range(n)]
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return {"mean": round(mean, 6), "std": round(std, 6), "values": values}


def transfer_report(
    rng: random.Random, job_id: str, seeds: list[int], epochs: int, labels: list[str]
) -> dict[str, Any]:
    """A finetune job's transfer report with the shape graft/report.py writes."""
    n = len(seeds)

    def arm() -> dict[str, Any]:
        return {
            "val_accuracy": _stat(rng, n, 0.6, 0.95),
            "val_macro_f1": _stat(rng, n, 0.55, 0.95),
            "val_loss": _stat(rng, n, 0.1, 1.2),
            "train_accuracy": _stat(rng, n, 0.7, 1.0),
            "train_val_gap": _stat(rng, n, 0.0, 0.2),
            "best_epoch": [rng.randint(1, epochs) for _ in seeds],
            "epochs_run": [epochs for _ in seeds],
        }

    def confusion() -> list[list[int]]:
        return [[rng.randint(0, 40) for _ in labels] for _ in labels]

    return {
        "object": "job.report",
        "kind": "transfer",
        "job_id": job_id,
        "metric": "val_accuracy",
        "seeds": seeds,
        "validation_examples": rng.randint(80, 2000),
        "budget": {
            "epochs": epochs,
            "batch_size": 32,
            "transferred": {"method": "full", "learning_rate": 5e-5},
            "scratch": {"method": "full", "learning_rate": 1e-3},
        },
        "transferred": arm(),
        "scratch": arm(),
        "gain": {key: _stat(rng, n, -0.05, 0.3) for key in ("val_accuracy", "val_macro_f1", "val_loss")},
        "spread": round(rng.uniform(0.005, 0.05), 6),
        "negative_transfer": rng.random() < 0.05,
        "convergence": {
            "per_seed": [
                {
                    "scratch_best_val_accuracy": round(rng.uniform(0.5, 0.9), 6),
                    "scratch_epochs_to_best": epochs,
                    "transferred_epochs_to_reach_it": rng.randint(1, epochs),
                    "speedup": round(rng.uniform(1, 8), 4),
                }
                for _ in seeds
            ],
            "speedup": round(rng.uniform(1, 8), 4),
        },
        "per_class": {
            label: {"transferred": round(rng.random(), 6), "scratch": round(rng.random(), 6)}
            for label in labels
        },
        "confusion_matrix": {"labels": labels, "transferred": confusion(), "scratch": confusion()},
        "learning_curves": {
            "transferred": [_curve(rng, epochs, 0.5) for _ in seeds],
            "scratch": [_curve(rng, epochs, 0.2) for _ in seeds],
        },
        "summary": "Transfer helped: +14.2 points of validation accuracy against training from scratch "
        f"(spread 1.9 over {n} seeds). It reached the scratch model's best 4.1x sooner.",
    }


def adaptation_report(
    rng: random.Random, job_id: str, seeds: list[int], epochs: int, methods: list[str], labels: list[str]
) -> dict[str, Any]:
    """An adapt job's report: every method beside source_only, curves per seed and epoch."""
    n = len(seeds)
    summaries = {
        method: {
            "source_val_accuracy": _stat(rng, n, 0.7, 0.97),
            "target_accuracy": _stat(rng, n, 0.4, 0.9),
            "target_macro_f1": _stat(rng, n, 0.35, 0.9),
            "prediction_entropy": _stat(rng, n, 0.1, 1.5),
            "class_balance": {
                label: round(1 / len(labels) + rng.uniform(-0.05, 0.05), 6) for label in labels
            },
            "a_distance": _stat(rng, n, 0.2, 1.9),
            "mmd": _stat(rng, n, 0.001, 0.3),
            "learning_curves": [_curve(rng, epochs, 0.3) for _ in seeds],
        }
        for method in ["source_only", *methods]
    }
    return {
        "object": "job.report",
        "kind": "adaptation",
        "job_id": job_id,
        "seeds": seeds,
        "evaluation_labels": True,
        "methods": summaries,
        "gain_over_source_only": {method: _stat(rng, n, -0.05, 0.2) for method in methods},
        "best_method": methods[0],
        "evaluation_examples": rng.randint(200, 5000),
        "helped": methods[:1],
        "summary": f"{methods[0]} helped most on the target domain.",
    }


def resume_state(rng: random.Random, job_id: str, runs: list[str], epochs: int) -> dict[str, Any]:
    """workers/runner.py DatabaseJournal's entries, one per run of the job (arm and seed)."""
    return {
        run: {
            "path": f"checkpoints/{job_id}/state/{secrets.token_hex(16)}.safetensors",
            "epoch": (epoch := rng.randint(1, epochs)),
            "batch": rng.choice([0, rng.randint(1, 400)]),
            "step": epoch * rng.randint(20, 400),
            "complete": False,
            "best_epoch": rng.randint(1, epoch),
        }
        for run in runs
    }


def plan_values(
    kind: str,
    base: str,
    method: str | None,
    hyperparameters: dict[str, Any],
    *,
    seed: int,
    seeds: list[int] | None,
    baseline: bool,
    methods: list[str] | None,
    classes: int,
) -> dict[str, Any]:
    """The plan of runs (graft/plan.py) the API would store with such a job, priced for its architecture."""
    from graft.catalog import BUILTIN_MODELS
    from graft.compute import Network
    from graft.jobspec import (
        AdaptHyperparameters,
        AdaptSpec,
        DistillHyperparameters,
        DistillSpec,
        EvaluateSpec,
        FinetuneHyperparameters,
        Student,
        TrainingSpec,
    )
    from graft.plan import (
        DataFacts,
        Upstream,
        plan_adaptation,
        plan_distillation,
        plan_evaluation,
        plan_training,
    )
    from graft.spec import ModelSpec

    architecture = base if base in BUILTIN_MODELS else "resnet-small"
    network = Network.of(ModelSpec.for_builtin(architecture), classes=classes, mean_text_chars=140.0)
    upstream = Upstream(id=base, learned=True, architecture=architecture, network=network)
    data = DataFacts(examples=2000, class_counts={str(c): 2000 // classes for c in range(classes)})
    if kind == "evaluate":
        plan = plan_evaluation(
            EvaluateSpec(kind="evaluate", model=base, dataset="ds"), network=network, dataset=data
        )
    elif kind == "adapt":
        hp = AdaptHyperparameters.model_validate(
            {
                "adaptation_weight": 1.0,
                "pseudo_label_threshold": 0.9,
                "mcc_temperature": 2.5,
                **hyperparameters,
            }
        )
        spec = AdaptSpec(
            kind="adapt", base_model=base, source_dataset="ds", target_dataset="ds2", backbone="full",
            method="full", methods=[m for m in methods or ["dann"] if m in ("dann", "coral", "mmd")] or ["mmd"],
            hyperparameters=hp,
        )  # fmt: skip
        plan = plan_adaptation(spec, seed, upstream=upstream, source=data, target=data)
    elif kind == "distill":
        distilled = DistillSpec(
            kind="distill", teacher=base, student=Student(architecture="minilm-l6", layers=2),
            training_dataset="ds", backbone="full", method="full",
            hyperparameters=DistillHyperparameters.model_validate(hyperparameters),
        )  # fmt: skip
        plan = plan_distillation(
            distilled, seed, teacher=network, student=upstream, train=data, labelled=True
        )
    else:
        training = TrainingSpec(
            kind=kind, base_model=base, method=method or "full", training_dataset="ds", baseline=baseline,
            baseline_arms=["scratch"] if baseline else None, seeds=seeds,
            hyperparameters=FinetuneHyperparameters.model_validate(hyperparameters),
        )  # fmt: skip
        plan = plan_training(training, seed, upstream=upstream, train=data, scratch=network)
    return plan.model_dump(mode="json")


def job_values(rng: random.Random, project_id: str, created: datetime, now: datetime) -> dict[str, Any]:
    """One job row as the service and its workers leave it, by status (attribute names of graft.tables.Job)."""
    from graft.ids import new_id

    job_id = new_id("job")
    kind = _pick(rng, TYPE_MIX)
    status = _pick(rng, STATUS_MIX)
    labels = rng.choice(CLASSES)
    epochs = rng.choice([3, 5, 10, 20, 30])
    steps_per_epoch = rng.randint(20, 400)
    baseline = kind == "finetune" and rng.random() < 0.4
    seeds = [1, 2, 3] if baseline and rng.random() < 0.7 else ([1, 2, 3, 4, 5] if baseline else None)
    method = {
        "finetune": rng.choice(["linear_probe", "partial", "full", "lora"]),
        "pretrain": rng.choice(["self_supervised", "full"]),
    }.get(kind)
    hyperparameters: dict[str, Any] = {
        "epochs": epochs,
        "batch_size": rng.choice([16, 32, 64, 128]),
        "learning_rate": rng.choice([1e-2, 2e-3, 1e-3, 3e-4, 5e-5, 2e-5]),
        "weight_decay": 0.01,
        "validation_split": 0.1,
        "warmup_ratio": 0.06,
        "max_grad_norm": 1.0,
        "freeze_batch_norm": kind == "finetune",
    }
    if method in ("partial", "full"):
        hyperparameters |= {"layer_lr_decay": 0.8, "head_warmup_epochs": 1}
    if kind == "distill":
        hyperparameters |= {"temperature": 4.0, "alpha": 0.5}
    methods = rng.sample(ADAPT_METHODS, rng.randint(1, 4)) if kind == "adapt" else None
    started = created + timedelta(seconds=rng.uniform(1, 120)) if status != "queued" else None
    done_epochs = {"succeeded": epochs, "running": rng.randint(0, epochs - 1)}.get(
        status, rng.randint(0, epochs)
    )
    progress = (
        {
            "epoch": done_epochs,
            "epochs": epochs,
            "step": done_epochs * steps_per_epoch
            + (rng.randint(0, steps_per_epoch) if status == "running" else 0),
            "total_steps": epochs * steps_per_epoch,
        }
        if started is not None
        else None
    )
    metrics = (
        {
            "epoch": float(max(done_epochs, 1)),
            "train_loss": round(rng.uniform(0.05, 1.2), 6),
            "train_accuracy": round(rng.uniform(0.6, 0.99), 6),
            "val_loss": round(rng.uniform(0.1, 1.4), 6),
            "val_accuracy": round(rng.uniform(0.55, 0.97), 6),
        }
        if progress is not None and done_epochs > 0
        else None
    )
    if status == "succeeded" and metrics is not None:
        metrics["best_epoch"] = rng.randint(1, epochs)
    finished = (
        started + timedelta(seconds=rng.uniform(60, 7200))
        if started and status in ("succeeded", "failed", "cancelled")
        else None
    )
    transfer = (
        (
            {"kind": "task", "head": "new", "source_classes": [], "matched_classes": 0}
            if rng.random() < 0.8
            else {"kind": "domain", "head": "keep", "source_classes": labels, "matched_classes": len(labels)}
        )
        if started is not None and kind in ("finetune", "pretrain")
        else None
    )
    report = None
    if status == "succeeded":
        if baseline and seeds:
            report = transfer_report(rng, job_id, seeds, epochs, labels)
        elif kind == "adapt" and methods:
            report = adaptation_report(rng, job_id, [1, 2, 3], epochs, methods, labels)
    base = rng.choice(BASE_MODELS[kind])
    job_seed = rng.randint(0, 2**31)
    plan = plan_values(
        kind,
        base,
        method,
        hyperparameters,
        seed=job_seed,
        seeds=seeds,
        baseline=baseline,
        methods=methods,
        classes=len(labels),
    )
    requeued = status == "queued" and rng.random() < 0.3
    attempts = 0 if status == "queued" and not requeued else rng.choice([1, 1, 1, 1, 2])
    state = None
    if status == "running" or requeued:
        runs = (
            [f"{arm}/seed-{seed}" for arm in ("transferred", "scratch") for seed in (seeds or [1])]
            if kind == "finetune"
            else [f"{m}/seed-{seed}" for m in ["source_only", *(methods or [])] for seed in (1, 2, 3)]
            if kind == "adapt"
            else ["main"]
        )
        state = resume_state(rng, job_id, runs, epochs)
    return {
        "id": job_id,
        "project_id": project_id,
        "type": kind,
        "status": status,
        "base_model": base,
        "training_dataset": _token(rng, "ds") if kind != "evaluate" else None,
        "validation_dataset": _token(rng, "ds") if rng.random() < 0.2 else None,
        "target_dataset": _token(rng, "ds") if kind == "adapt" else None,
        "evaluation_dataset": _token(rng, "ds") if kind in ("adapt", "distill", "evaluate") else None,
        "methods": methods,
        "student": {"architecture": "minilm-l6", "layers": 2} if kind == "distill" else None,
        "method": method,
        "hyperparameters": hyperparameters,
        "plan": plan,
        "seed": job_seed,
        "head": None,
        "initialization": None,
        "from_checkpoint": None,
        "baseline": baseline,
        "seeds": seeds,
        "transfer": transfer,
        "report": report,
        "best_checkpoint": _token(rng, "ckpt") if metrics is not None else None,
        "user_metadata": {
            "experiment": rng.choice(["baseline", "lr-sweep", "ablation"]),
            "owner": rng.choice(["ana", "bo", "chen"]),
        }
        if rng.random() < 0.5
        else None,
        "idempotency_key": secrets.token_hex(16) if rng.random() < 0.3 else None,
        "request_hash": secrets.token_hex(32),
        "progress": progress,
        "metrics": metrics,
        "error": rng.choice(ERRORS) if status == "failed" else None,
        "result_model": _token(rng, "mdl") if status == "succeeded" else None,
        "cancel_requested": status == "cancelled",
        "attempts": attempts,
        "lease_owner": f"graft-gpu@node-{rng.randint(1, 8)}:{rng.randint(100, 9999)}"
        if status == "running"
        else None,
        "lease_token": attempts,
        # Live workers renew these every few seconds; no worker runs here, so they are set ahead and the
        # reaper (running at its default interval) finds no lease to expire while the load runs.
        "heartbeat_at": now + timedelta(days=1) if status == "running" else None,
        "release_requested": False,
        "worker_losses": 1 if attempts > 1 and rng.random() < 0.5 else 0,
        "dispatched_at": created if status in ("queued", "running") else None,
        "resume_state": state,
        "created_at": created,
        "started_at": started,
        "finished_at": finished,
    }


JSON_COLUMNS = (
    "methods",
    "student",
    "hyperparameters",
    "plan",
    "seeds",
    "transfer",
    "report",
    "user_metadata",
    "progress",
    "metrics",
    "error",
    "resume_state",
    "data",
)


def without_json_none(values: dict[str, Any]) -> dict[str, Any]:
    """SQLAlchemy's JSON type writes None as JSON `null`; the service leaves these columns SQL NULL (it
    never sets them, or writes `null()`), which `IS NULL` and the reaper's queries rely on."""
    return {k: v for k, v in values.items() if not (v is None and k in JSON_COLUMNS)}


def view_of(values: dict[str, Any]) -> dict[str, Any]:
    """The job response of a seeded row (the anchors' view of it)."""
    return job_view(
        {**values, "metadata": values["user_metadata"], "has_report": values["report"] is not None}
    )


@dataclass
class Seeded:
    project_id: str
    ids: list[str]
    statuses: dict[str, int]
    events: int
    reports: int
    report_kib_mean: float
    states: int
    state_kib_mean: float
    job_response_bytes_median: int
    static_body: bytes = field(repr=False)
    seconds: float = 0.0


def seed(settings: Any, n_jobs: int, rng: random.Random) -> Seeded:
    """n_jobs jobs of the bootstrap project (oldest first, so pk order is creation order) and a few hundred
    events of the newest ones, with broker messages for the queued ones, as the service leaves them."""
    from sqlalchemy import func, insert, select

    from graft.db import make_engine, make_session_factory, session_scope
    from graft.ids import new_id
    from graft.queueing import JobQueue
    from graft.tables import Job, JobEvent, Project

    started = time.perf_counter()
    engine = make_engine(settings.effective_database_url)
    factory = make_session_factory(engine)
    now = datetime.now(UTC)
    with session_scope(factory) as session:
        projects = list(session.scalars(select(Project.id)))
    if len(projects) != 1:
        raise RuntimeError(f"expected the bootstrap project alone, found {projects}")
    project_id = projects[0]
    ids, statuses = [], Counter[str]()
    report_bytes, state_bytes, sizes, queued = [], [], [], []
    views: list[tuple[int, dict[str, Any]]] = []
    span = timedelta(days=90)
    chunk: list[dict[str, Any]] = []

    def flush() -> None:
        with session_scope(factory) as session:
            session.execute(insert(Job), chunk)
        chunk.clear()

    for i in range(n_jobs):
        created = now - span + span * (i / n_jobs) - timedelta(minutes=5)
        values = job_values(rng, project_id, created, now)
        ids.append(values["id"])
        statuses[values["status"]] += 1
        if values["status"] == "queued":
            queued.append(values["id"])
        if values["report"] is not None:
            report_bytes.append(len(json.dumps(values["report"])))
        if values["resume_state"] is not None:
            state_bytes.append(len(json.dumps(values["resume_state"])))
        view = view_of(values)
        size = len(json.dumps(view).encode())
        sizes.append(size)
        if i % 50 == 0:
            views.append((size, view))
        chunk.append(without_json_none(values))
        if len(chunk) == 500:
            flush()
    if chunk:
        flush()
    events = []
    for job_id in ids[-60:]:
        for n, message in enumerate(("Job queued", "Job started", "Training 3 epochs", "metrics", "metrics")):
            events.append(
                {
                    "id": new_id("evt"),
                    "job_id": job_id,
                    "type": "metrics" if message == "metrics" else "message",
                    "level": "info",
                    "message": f"Epoch {n - 2} of 3" if message == "metrics" else message,
                    "data": {
                        "epoch": n - 2,
                        "train_loss": round(rng.uniform(0.1, 1), 6),
                        "val_accuracy": round(rng.uniform(0.5, 0.95), 6),
                        "epoch_seconds": round(rng.uniform(2, 60), 3),
                    }
                    if message == "metrics"
                    else None,
                    "created_at": now - timedelta(minutes=4) + timedelta(seconds=n),
                }
            )
    with session_scope(factory) as session:
        session.execute(insert(JobEvent), [without_json_none(event) for event in events])
        count = session.scalar(select(func.count()).select_from(Job).where(Job.project_id == project_id))
    engine.dispose()
    if count != n_jobs:
        raise RuntimeError(f"seeded {count} jobs, expected {n_jobs}")
    queue = JobQueue(settings)  # queued jobs have their message in the broker, as after POST /v1/jobs
    sent = sum(queue.send(job_id) for job_id in queued)
    if sent != len(queued):
        raise RuntimeError(f"the broker took {sent} of {len(queued)} messages")
    typical = sorted(sizes)[len(sizes) // 2]
    closest = min(views, key=lambda pair: abs(pair[0] - typical))[1]
    body = json.dumps(closest).encode()
    return Seeded(
        project_id=project_id,
        ids=ids,
        statuses=dict(statuses),
        events=len(events),
        reports=len(report_bytes),
        report_kib_mean=sum(report_bytes) / max(1, len(report_bytes)) / 1024,
        states=len(state_bytes),
        state_kib_mean=sum(state_bytes) / max(1, len(state_bytes)) / 1024,
        job_response_bytes_median=typical,
        static_body=body,
        seconds=time.perf_counter() - started,
    )


# ---------------------------------------------------------------- backends


@dataclass
class Backend:
    name: str  # "postgresql" or "sqlite"
    settings: Any
    env: dict[str, str]  # the GRAFT_* environment of the Graft server
    dsn: str | None  # asyncpg DSN for the raw anchor (PostgreSQL only)
    work: Path  # temp dir: wrk scripts, static body
    seeded: Seeded
    key: str


@contextlib.contextmanager
def backend(name: str, n_jobs: int, rng: random.Random) -> Iterator[Backend]:
    """A fresh database migrated and bootstrapped by `prestart`, seeded; removed afterwards."""
    from app.cli import prestart
    from graft.config import Settings

    key = "graft_bench_" + secrets.token_hex(14)  # 40 characters
    queue = f"graft-bench-{secrets.token_hex(4)}"  # no worker consumes it
    database = f"graft_bench_{secrets.token_hex(4)}" if name == "postgresql" else None
    with tempfile.TemporaryDirectory(prefix=f"graft-bench-api-{name}-") as temp:
        home = Path(temp) / "home"
        work = Path(temp) / "work"
        work.mkdir()
        if database is not None:
            import psycopg

            with psycopg.connect("postgresql://postgres@127.0.0.1:5432/postgres", autocommit=True) as conn:
                conn.execute(f'CREATE DATABASE "{database}"')
            url, broker = f"{POSTGRES}/{database}", REDIS
        else:
            url, broker = f"sqlite:///{home / 'graft.db'}", None
        try:
            settings = Settings(
                home=home,
                database_url=url,
                broker_url=broker,
                bootstrap_api_key=key,  # type: ignore[arg-type]
                worker_queue=queue,
                rate_limit_per_minute=0,
            )
            prestart(settings)
            seeded = seed(settings, n_jobs, rng)
            reaper_default = Settings.model_fields["reaper_interval_seconds"].default
            env = {
                "GRAFT_HOME": str(home),
                "GRAFT_DATABASE_URL": url,
                "GRAFT_WORKER_QUEUE": queue,
                "GRAFT_BOOTSTRAP_API_KEY": key,
                "GRAFT_RATE_LIMIT_PER_MINUTE": "0",
                "GRAFT_REAPER_INTERVAL_SECONDS": str(reaper_default),
                "GRAFT_HOST": "127.0.0.1",
            }
            if broker is not None:
                env["GRAFT_BROKER_URL"] = broker
            dsn = f"postgresql://postgres@127.0.0.1:5432/{database}" if database else None
            yield Backend(name, settings, env, dsn, work, seeded, key)
        finally:
            if broker is not None:
                with contextlib.suppress(Exception):
                    import redis

                    client = redis.Redis.from_url(broker)
                    for stale in client.scan_iter(match=f"*{queue}*"):
                        client.delete(stale)
                    client.close()
            if database is not None:
                import psycopg

                with psycopg.connect(
                    "postgresql://postgres@127.0.0.1:5432/postgres", autocommit=True
                ) as conn:
                    conn.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')


# ---------------------------------------------------------------- servers


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def http_get(url: str, headers: dict[str, str] | None = None, timeout: float = 3.0) -> tuple[int, bytes]:
    """(status, body); status 0 when nothing answered in time."""
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return int(response.status), response.read()
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read()
    except (OSError, TimeoutError):
        return 0, b""


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process and its threads."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return math.nan


def machine_busy_seconds() -> float:
    """CPU time all cores spent busy since boot (/proc/stat), in core-seconds."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def postgres_cpu() -> dict[int, float]:
    """CPU seconds of every PostgreSQL process (server and backends) by pid."""
    found = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if (entry / "comm").read_text().strip() == "postgres":
                    seconds = cpu_seconds(int(entry.name))
                    if not math.isnan(seconds):  # it exited meanwhile
                        found[int(entry.name)] = seconds
    return found


@dataclass
class CpuSnapshot:
    """Where the machine's CPU went during a run: the server, PostgreSQL, wrk, and everything else (this
    process included: next to nothing; the rest is other work on the shared machine)."""

    busy: float
    server: float
    postgres: dict[int, float]
    children: float

    @classmethod
    def take(cls, pid: int) -> CpuSnapshot:
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        return cls(machine_busy_seconds(), cpu_seconds(pid), postgres_cpu(), usage.ru_utime + usage.ru_stime)

    def until(self, later: CpuSnapshot) -> dict[str, float]:
        postgres = sum(v - self.postgres.get(pid, 0.0) for pid, v in later.postgres.items())
        split = {
            "server": later.server - self.server,
            "postgres": postgres,
            "wrk": later.children - self.children,  # the only child reaped during a run
        }
        split["other"] = max(0.0, later.busy - self.busy - sum(split.values()))
        return split


class StartFailed(RuntimeError):
    def __init__(self, message: str, log: Path) -> None:
        super().__init__(message)
        self.log = log


@dataclass
class Server:
    label: str
    process: subprocess.Popen[bytes]
    port: int
    log: Path
    stop_note: str = ""

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self) -> str:
        """SIGTERM to its process group, SIGKILL after a grace period; how it went."""
        if self.process.poll() is not None:
            return f"had exited ({self.process.returncode})"
        started = time.monotonic()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(STOP_GRACE_S)
            return f"stopped in {time.monotonic() - started:.1f} s"
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
            return f"did not stop within {STOP_GRACE_S:.0f} s of SIGTERM: killed"


@dataclass(frozen=True)
class ServerSpec:
    kind: str  # "graft" or "anchor"
    ready_path: str  # answers 200 once the server is up (and its database reachable)


GRAFT = ServerSpec("graft", "/readyz")


def anchor_spec(b: Backend) -> ServerSpec:
    return ServerSpec("anchor", "/jobs?limit=1" if b.dsn else "/static")


def command_and_env(spec: ServerSpec, b: Backend, port: int) -> tuple[list[str], dict[str, str]]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GRAFT_", "BENCH_ANCHOR_"))}
    env["PYTHONUNBUFFERED"] = "1"
    if spec.kind == "graft":
        # Exactly as docker-compose runs the API: `python -m app.cli api` (uvicorn app.main:app, one
        # worker, --no-access-log) with the GRAFT_* environment.
        env |= b.env | {"GRAFT_PORT": str(port)}
        return [sys.executable, "-m", "app.cli", "api"], env
    static = b.work / "static.json"
    static.write_bytes(b.seeded.static_body)
    env |= {
        "BENCH_ANCHOR_STATIC": str(static),
        "BENCH_ANCHOR_PROJECT": b.seeded.project_id,
        "BENCH_ANCHOR_POOL_MIN": str(POOL_MIN),
        "BENCH_ANCHOR_POOL_MAX": str(POOL_MAX),
    }
    if b.dsn:
        env["BENCH_ANCHOR_DSN"] = b.dsn
    command = [
        sys.executable,
        "-m",
        "uvicorn",
        "bench.api_anchors:app",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--no-access-log",
    ]
    return command, env


@contextlib.contextmanager
def server(spec: ServerSpec, b: Backend, label: str, logs: Path) -> Iterator[Server]:
    """One server process (its own session, so that stopping it stops all it started), up and answering."""
    failures = []
    for attempt in range(1, START_ATTEMPTS + 1):
        port = free_port()
        command, env = command_and_env(spec, b, port)
        log = logs / f"{b.name}-{label}{'' if attempt == 1 else f'-try{attempt}'}.log"
        with log.open("wb") as out:
            process = subprocess.Popen(
                command, env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        running = Server(label, process, port, log)
        deadline = time.monotonic() + START_TIMEOUT_S
        while running.alive() and time.monotonic() < deadline:
            if http_get(running.base + spec.ready_path, timeout=2)[0] == 200:
                break
            time.sleep(0.3)
        else:
            how = running.stop()
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:])
            failures.append(f"attempt {attempt}: not answering {spec.ready_path} ({how}); log {log}:\n{tail}")
            print(f"  {label}: server did not start (attempt {attempt}), log {rel(log)}", flush=True)
            if attempt < START_ATTEMPTS:
                time.sleep(START_RETRY_PAUSE_S)
            continue
        try:
            yield running
        finally:
            running.stop_note = running.stop()
        return
    raise StartFailed("\n".join(failures), log)


def rel(path: Path) -> str:
    with contextlib.suppress(ValueError):
        return str(path.relative_to(ROOT))
    return str(path)


# ---------------------------------------------------------------- wrk

LUA = """-- bench/api.py: GET `path` (with a random job id appended when `mode` is random), counting statuses.
local ids = {
%(ids)s
}
local threads = {}
-- A monotonic clock (LuaJIT's FFI): the longest time no response came, to tell a stall from slowness.
local ffi = require("ffi")
ffi.cdef[[
typedef struct { long tv_sec; long tv_nsec; } bench_timespec;
int clock_gettime(int clk_id, bench_timespec *tp);
]]
local ts = ffi.new("bench_timespec")
local function now()
  ffi.C.clock_gettime(1, ts)
  return tonumber(ts.tv_sec) + tonumber(ts.tv_nsec) / 1e9
end
function setup(thread)
  table.insert(threads, thread)
end
function init(args)
  path = args[1]
  mode = args[2]
  statuses = {}
  started = now()
  last = started
  silence = 0
  math.randomseed(os.time() + tonumber(args[3] or "0"))
  wrk.headers["Authorization"] = "Bearer %(key)s"
end
function request()
  if mode == "random" then
    return wrk.format("GET", path .. ids[math.random(#ids)])
  end
  return wrk.format("GET", path)
end
function response(status, headers, body)
  statuses[status] = (statuses[status] or 0) + 1
  local t = now()
  if t - last > silence then silence = t - last end
  last = t
end
function done(summary, latency, requests)
  local counts = {}
  local ended = now()
  local longest = 0
  for _, t in ipairs(threads) do
    for code, n in pairs(t:get("statuses") or {}) do
      counts[code] = (counts[code] or 0) + n
    end
    -- the longest gap between responses, or from the last response to the end of the run
    longest = math.max(longest, t:get("silence") or 0, ended - (t:get("last") or ended))
  end
  local parts = {}
  for code, n in pairs(counts) do
    table.insert(parts, string.format('"%%d": %%d', code, n))
  end
  local e = summary.errors
  io.write(string.format(
    'BENCH_RESULT {"duration_us": %%d, "requests": %%d, "bytes": %%d, ' ..
    '"errors": {"connect": %%d, "read": %%d, "write": %%d, "status": %%d, "timeout": %%d}, ' ..
    '"latency_us": {"mean": %%.1f, "max": %%d, "p50": %%d, "p90": %%d, "p99": %%d}, ' ..
    '"silence_s": %%.3f, "statuses": {%%s}}\\n',
    summary.duration, summary.requests, summary.bytes, e.connect, e.read, e.write, e.status, e.timeout,
    latency.mean, latency.max, latency:percentile(50), latency:percentile(90), latency:percentile(99),
    longest, table.concat(parts, ", ")))
end
"""


def write_lua(b: Backend) -> Path:
    path = b.work / "load.lua"
    path.write_text(LUA % {"ids": ",\n".join(f'"{i}"' for i in b.seeded.ids), "key": b.key})
    return path


@dataclass
class Run:
    connections: int
    seconds: float
    requests: int
    rps: float
    p50_ms: float | None
    p99_ms: float | None
    max_ms: float | None
    statuses: dict[str, int]
    non_2xx: int
    socket_errors: dict[str, int]
    errors: int
    silence_s: float  # the longest time no connection got a response (gaps, and the last one to the end)
    hang: bool  # nothing answered at all, or nothing for STALL_S or more
    answered_after: int  # the server's /healthz status right after the run (0: no answer within 3 s)
    server_cpu_s: float
    cpu_s: dict[str, float] = field(default_factory=dict)  # server, postgres, wrk, other (core-seconds)
    harness_error: str | None = None

    @property
    def problems(self) -> str:
        found = []
        if self.harness_error:
            found.append(self.harness_error)
        if self.hang and self.requests == 0:
            found.append(f"**hang: no response in {self.seconds:.0f} s**")
        elif self.hang:
            found.append(f"**stall: no response for {self.silence_s:.1f} s**")
        bad = {code: n for code, n in sorted(self.statuses.items()) if not code.startswith("2")}
        found += [f"{n} x HTTP {code}" for code, n in bad.items()]
        found += [f"{n} socket {kind}" for kind, n in self.socket_errors.items() if n]
        return ", ".join(found) or "none"


def wrk_run(srv: Server, lua: Path, path: str, mode: str, connections: int, seconds: float) -> Run:
    command = [
        WRK,
        "-t1",
        f"-c{connections}",
        f"-d{seconds:g}s",
        f"--timeout={WRK_TIMEOUT_S}s",
        "--latency",
        "-s",
        str(lua),
        srv.base,
        "--",
        path,
        mode,
        str(random.randint(0, 10**6)),
    ]
    before = CpuSnapshot.take(srv.process.pid)
    failed = None
    try:
        result = subprocess.run(
            command, capture_output=True, text=True, timeout=seconds + WRK_TIMEOUT_S + 60, check=False
        )
        output = result.stdout + result.stderr
    except subprocess.TimeoutExpired as exc:
        output = (exc.stdout or b"").decode(errors="replace") if isinstance(exc.stdout, bytes) else ""
        failed = "wrk did not finish"
    cpu_split = before.until(CpuSnapshot.take(srv.process.pid))
    match = re.search(r"^BENCH_RESULT (\{.*\})$", output, re.MULTILINE)
    if match is None:
        failed = failed or f"no result from wrk: {output.strip()[-300:]}"
        data: dict[str, Any] = {
            "duration_us": seconds * 1e6,
            "requests": 0,
            "errors": {},
            "latency_us": {},
            "statuses": {},
        }
    else:
        data = json.loads(match.group(1))
    statuses = {str(code): int(n) for code, n in data["statuses"].items()}
    sockets = {kind: int(data["errors"].get(kind, 0)) for kind in ("connect", "read", "write", "timeout")}
    # Cross-check with wrk's own summary lines.
    text_non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    non_2xx = sum(n for code, n in statuses.items() if not code.startswith("2"))
    if text_non2xx is not None:
        non_2xx = max(non_2xx, int(text_non2xx.group(1)))
    requests = int(data["requests"])
    duration = float(data["duration_us"]) / 1e6 or seconds
    latency = data["latency_us"]

    def ms(key: str) -> float | None:
        return float(latency[key]) / 1000 if requests and key in latency else None

    silence = float(data.get("silence_s", duration if not requests else 0.0))
    answered_after = http_get(srv.base + "/healthz", timeout=3)[0] if srv.alive() else -1
    return Run(
        connections=connections,
        seconds=duration,
        requests=requests,
        rps=requests / duration if duration else 0.0,
        p50_ms=ms("p50"),
        p99_ms=ms("p99"),
        max_ms=ms("max"),
        statuses=statuses,
        non_2xx=non_2xx,
        socket_errors=sockets,
        errors=non_2xx + sum(sockets.values()),
        silence_s=silence,
        hang=failed is None and (requests == 0 or silence >= STALL_S),
        answered_after=answered_after,
        server_cpu_s=cpu_split["server"],
        cpu_s=cpu_split,
        harness_error=failed,
    )


# ---------------------------------------------------------------- server logs

LEVEL = re.compile(r"\b(ERROR|CRITICAL|WARNING)\b")
NUMBERS = re.compile(r"\b(job|evt|proj|key)_[a-z2-7]{24}\b")


def log_notes(paths: Sequence[Path], limit: int = 6) -> list[str]:
    """The distinct error and warning lines of server logs and the exceptions their tracebacks end with,
    with how often each came."""
    lines = [
        line for path in paths if path.exists() for line in path.read_text(errors="replace").splitlines()
    ]
    counts: Counter[str] = Counter()
    in_traceback = False
    for line in lines:
        if line.startswith("Traceback (most recent call last)"):
            in_traceback = True
            continue
        if in_traceback:
            if line.startswith((" ", "\t")) or not line.strip():
                continue
            if line.startswith(("During handling", "The above exception")):
                continue
            counts["exception: " + NUMBERS.sub(r"\1_…", line.strip())[:200]] += 1
            in_traceback = False
            continue
        if LEVEL.search(line):
            text = re.sub(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ ", "", line.strip())
            counts[NUMBERS.sub(r"\1_…", text)[:200]] += 1
    return [f"{n} x `{text}`" for text, n in counts.most_common(limit)] + (
        [f"… and {len(counts) - limit} other distinct lines"] if len(counts) > limit else []
    )


# ---------------------------------------------------------------- measuring


@dataclass
class Target:
    key: str
    title: str
    spec: ServerSpec
    path: str
    mode: str  # "random": a random job id appended per request; "fixed"


def targets(b: Backend) -> list[Target]:
    anchor = anchor_spec(b)
    chosen = [Target("graft_get", "Graft `GET /v1/jobs/{id}`", GRAFT, "/v1/jobs/", "random")]
    if b.dsn:
        chosen.append(Target("raw_get", "anchor raw asyncpg `GET /jobs/{id}`", anchor, "/jobs/", "random"))
    chosen.append(Target("static", "anchor static JSON `GET /static`", anchor, "/static", "fixed"))
    chosen.append(
        Target("graft_list", "Graft list page `GET /v1/jobs?limit=20`", GRAFT, "/v1/jobs?limit=20", "fixed")
    )
    if b.dsn:
        chosen.append(
            Target("raw_list", "anchor list page `GET /jobs?limit=20`", anchor, "/jobs?limit=20", "fixed")
        )
    chosen.append(Target("graft_healthz", "Graft `GET /healthz`", GRAFT, "/healthz", "fixed"))
    return chosen


@dataclass
class Row:
    """One endpoint's measurements: a run per round, each on a fresh server with its own warm-up."""

    key: str
    label: str
    title: str
    connections: int
    runs: list[Run] = field(default_factory=list)
    warmups: list[Run] = field(default_factory=list)
    logs: list[str] = field(default_factory=list)
    log_notes: list[str] = field(default_factory=list)
    stops: list[str] = field(default_factory=list)  # how each server stopped
    start_errors: list[str] = field(default_factory=list)
    sample: dict[str, Any] | None = None  # response bodies of the first round, to compare shapes

    @property
    def start_error(self) -> str | None:
        return "\n".join(self.start_errors) if self.start_errors else None

    @property
    def log(self) -> str:
        """The server log, or a pattern for the logs of all rounds."""
        if len(self.logs) <= 1:
            return self.logs[0] if self.logs else ""
        return re.sub(r"-1(-try\d+)?\.log$", "-*.log", self.logs[0])

    @property
    def rps(self) -> float | None:
        return median([r.rps for r in self.runs]) if self.runs else None

    @property
    def p99(self) -> float | None:
        values = [r.p99_ms for r in self.runs if r.p99_ms is not None]
        return median(values) if values else None

    @property
    def p50(self) -> float | None:
        values = [r.p50_ms for r in self.runs if r.p50_ms is not None]
        return median(values) if values else None

    @property
    def errors(self) -> int:
        return sum(r.errors for r in self.runs)


def sample_bodies(srv: Server, t: Target, b: Backend, ids: list[str]) -> dict[str, Any]:
    """The responses to a few fixed requests, parsed (to check the anchor answers what Graft answers)."""
    headers = {"Authorization": f"Bearer {b.key}"}
    paths = [t.path + job_id for job_id in ids] if t.mode == "random" else [t.path]
    found: dict[str, Any] = {}
    for path in paths:
        status, body = http_get(srv.base + path, headers, timeout=5)
        try:
            found[path] = {"status": status, "json": json.loads(body) if body else None}
        except ValueError:
            found[path] = {"status": status, "json": None}
    return found


def measure(
    row: Row,
    b: Backend,
    t: Target,
    lua: Path,
    logs: Path,
    seconds: float,
    warmup: float,
    warmup_connections: int,
    round_: int,
    rounds: int,
    sample_ids: list[str],
) -> None:
    """One round of a row: a fresh server, warm-up, one measured run, stop."""
    label = f"{row.label}-{round_}"
    try:
        with server(t.spec, b, label, logs) as srv:
            row.logs.append(rel(srv.log))
            if row.sample is None:
                row.sample = sample_bodies(srv, t, b, sample_ids)
            if warmup > 0:
                row.warmups.append(wrk_run(srv, lua, t.path, t.mode, warmup_connections, warmup))
            run = wrk_run(srv, lua, t.path, t.mode, row.connections, seconds)
            row.runs.append(run)
            p99 = f"{run.p99_ms:.1f} ms" if run.p99_ms is not None else "n/a"
            print(
                f"  {row.label} c={row.connections} round {round_}/{rounds}: {run.rps:,.0f} req/s, p99 {p99}, "
                f"errors: {run.problems}, /healthz after: {run.answered_after or 'no answer'}, "
                f"CPU {cpu_cell([run])}",
                flush=True,
            )
        row.stops.append(srv.stop_note)
    except StartFailed as exc:
        row.start_errors.append(str(exc))
        row.logs.append(rel(exc.log))
        row.stops.append("")  # nothing started: nothing to stop
        print(f"  {label}: HARNESS FAILURE, server did not start:\n{exc}", flush=True)


@dataclass
class BackendResult:
    name: str
    seeded: dict[str, Any]
    rows: list[Row]
    sweep: list[Row]
    load_before: str
    load_after: str
    shape_check: str


def compare_shapes(graft: Row | None, anchor: Row | None) -> str:
    if graft is None or anchor is None or not graft.sample or not anchor.sample:
        return "n/a"
    same = differ = 0
    notes = []
    for (_, g), (_, a) in zip(sorted(graft.sample.items()), sorted(anchor.sample.items()), strict=False):
        if g["status"] != 200:
            notes.append(f"Graft answered {g['status'] or 'nothing'}")
            continue
        if g["json"] == a["json"]:
            same += 1
        else:
            differ += 1
            gj, aj = g["json"] or {}, a["json"] or {}
            keys = sorted(k for k in set(gj) | set(aj) if gj.get(k) != aj.get(k))
            notes.append(f"differs in {keys[:8]}")
    summary = f"{same} of {same + differ} sampled job responses identical (JSON-equal) to Graft's"
    return summary + (f" ({'; '.join(sorted(set(notes))[:4])})" if notes else "")


def run_backend(name: str, args: argparse.Namespace, logs: Path, rng: random.Random) -> BackendResult:
    print(f"\n== {name}: creating and seeding {args.jobs:,} jobs", flush=True)
    with backend(name, args.jobs, rng) as b:
        s = b.seeded
        print(
            f"  seeded in {s.seconds:.1f} s: {s.statuses}, {s.reports} reports (mean {s.report_kib_mean:.1f} KiB), "
            f"{s.states} resume states (mean {s.state_kib_mean:.1f} KiB), job response ~{s.job_response_bytes_median} B",
            flush=True,
        )
        lua = write_lua(b)
        sample_ids = random.Random(7).sample(s.ids, 8)
        load_before = loadavg()
        chosen = targets(b)
        rows = [Row(t.key, t.key, t.title, args.connections) for t in chosen]
        # Rounds alternate the rows (one run each, on a fresh server), so that whatever else the shared
        # machine does falls on all of them alike; the ratios are also given round by round.
        for round_ in range(1, args.runs + 1):
            for row, t in zip(rows, chosen, strict=True):
                measure(row, b, t, lua, logs, args.duration, args.warmup, args.connections, round_, args.runs,
                        sample_ids)  # fmt: skip
        sweep = []
        for level in args.sweep:
            row = Row(chosen[0].key, f"sweep-c{level}", chosen[0].title, level)
            measure(row, b, chosen[0], lua, logs, args.sweep_duration, min(args.warmup, 2), min(level, 10), 1, 1,
                    sample_ids[:1])  # fmt: skip
            sweep.append(row)
        for row in [*rows, *sweep]:
            row.log_notes = log_notes([ROOT / log for log in row.logs])
        by_key = {row.key: row for row in rows}
        shape = compare_shapes(by_key.get("graft_get"), by_key.get("raw_get"))
        seeded = {k: v for k, v in asdict(s).items() if k not in ("ids", "static_body")}
        return BackendResult(name, seeded, rows, sweep, load_before, loadavg(), shape)


# ---------------------------------------------------------------- the report


def fmt_ms(value: float | None) -> str:
    return f"{value:.1f} ms" if value is not None else "n/a"


def fmt_rps(value: float | None) -> str:
    return f"{value:,.0f}" if value is not None else "n/a"


CPU_HEADER = "CPU, cores: server / PostgreSQL / wrk / other"


def cpu_cell(runs: Sequence[Run]) -> str:
    """The medians over runs of each CPU share, in cores (core-seconds over the run's seconds)."""
    runs = [r for r in runs if r.cpu_s and r.seconds]
    if not runs:
        return "n/a"
    parts = [median([r.cpu_s[k] / r.seconds for r in runs]) for k in ("server", "postgres", "wrk", "other")]
    return " / ".join(f"{v:.2f}" for v in parts)


def row_cells(row: Row) -> list[str]:
    if not row.runs:
        return [
            row.title,
            "**server did not start**",
            "",
            "",
            "",
            "",
            "",
            row.log,
        ]
    per_run = ", ".join(f"{r.rps:,.0f}" for r in row.runs)
    cpu = cpu_cell(row.runs)
    problems = "; ".join(sorted({r.problems for r in row.runs if r.problems != "none"})) or "none"
    if row.start_errors:
        problems += f"; **the server did not start in {len(row.start_errors)} round(s)**"
    after = [r.answered_after for r in row.runs]
    responsive = "yes" if all(code == 200 for code in after) else f"**no** ({after})"
    return [
        row.title,
        f"**{fmt_rps(row.rps)}** ({per_run})",
        fmt_ms(row.p50),
        f"**{fmt_ms(row.p99)}**",
        problems,
        f"{max(r.silence_s for r in row.runs):.2f} s" if row.runs else "n/a",
        responsive,
        cpu,
        row.log,
    ]


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def per_round(a: Row | None, b: Row | None) -> str:
    """a / b req/s round by round (the runs of a round ran back to back)."""
    if a is None or b is None or len(a.runs) != len(b.runs) or len(a.runs) < 2:
        return ""
    pairs = [f"{x.rps / y.rps:.0%}" if y.rps else "n/a" for x, y in zip(a.runs, b.runs, strict=True)]
    return f" (per round: {', '.join(pairs)})"


def verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("meets" if ok else "**misses**")


def backend_markdown(r: BackendResult, args: argparse.Namespace) -> str:
    s = r.seeded
    rows = {row.key: row for row in r.rows}
    title = "PostgreSQL + Redis" if r.name == "postgresql" else "Embedded SQLite + filesystem broker"
    mix = ", ".join(f"{n:,} {status}" for status, n in sorted(s["statuses"].items(), key=lambda kv: -kv[1]))
    table = markdown_table(
        [
            "endpoint",
            f"req/s, median ({args.runs} x {args.duration:g} s; per round)",
            "p50",
            "p99",
            "errors / hangs",
            "longest silence",
            "/healthz answers after each run",
            CPU_HEADER,
            "server log",
        ],
        [row_cells(row) for row in r.rows],
    )
    graft_get, graft_list = rows.get("graft_get"), rows.get("graft_list")
    lines = []
    sweep_clean = (
        all(not row.start_error and row.errors == 0 and not any(x.hang for x in row.runs) for row in r.sweep)
        if r.sweep
        else None
    )
    main_clean = all(
        not row.start_error and row.errors == 0 and not any(x.hang for x in row.runs)
        for row in r.rows
        if row.key.startswith("graft")
    )
    clean = main_clean and sweep_clean is not False  # no sweep run: the rows alone
    if r.name == "postgresql":
        raw, raw_list = rows.get("raw_get"), rows.get("raw_list")
        get_ratio = ratio(graft_get.rps if graft_get else None, raw.rps if raw else None)
        list_ratio = ratio(graft_list.rps if graft_list else None, raw_list.rps if raw_list else None)
        p99 = graft_get.p99 if graft_get else None
        errors_free = graft_get is not None and graft_get.errors == 0 and not graft_get.start_error
        lines = [
            [
                "Graft job GET / raw asyncpg GET, req/s at 50 connections",
                f"≥ {TARGET_GET_RATIO:.0%}",
                (f"{get_ratio:.1%}" if get_ratio is not None else "n/a") + per_round(graft_get, raw),
                verdict(None if get_ratio is None else get_ratio >= TARGET_GET_RATIO and errors_free),
            ],
            [
                "Graft job GET p99 at 50 connections (raw asyncpg: " + fmt_ms(raw.p99 if raw else None) + ")",
                f"≤ {TARGET_GET_P99_MS:.0f} ms",
                fmt_ms(p99),
                verdict(None if p99 is None else p99 <= TARGET_GET_P99_MS and errors_free),
            ],
            [
                "Graft list page / anchor list page, req/s (p99 "
                + fmt_ms(graft_list.p99 if graft_list else None)
                + " vs "
                + fmt_ms(raw_list.p99 if raw_list else None)
                + ")",
                f"within {TARGET_LIST_FACTOR:g}x (≥ {1 / TARGET_LIST_FACTOR:.0%})",
                (f"{list_ratio:.1%}" if list_ratio is not None else "n/a") + per_round(graft_list, raw_list),
                verdict(
                    None
                    if list_ratio is None
                    else list_ratio >= 1 / TARGET_LIST_FACTOR
                    and graft_list is not None
                    and graft_list.errors == 0
                ),
            ],
        ]
    static = rows.get("static")
    static_ratio = ratio(graft_get.rps if graft_get else None, static.rps if static else None)
    lines.append(
        [
            "Graft job GET / static JSON (the framework's ceiling), req/s",
            "(context)",
            (f"{static_ratio:.1%}" if static_ratio is not None else "n/a") + per_round(graft_get, static),
            "",
        ]
    )
    if static is not None and len(static.runs) > 1 and static.rps:
        values = [x.rps for x in static.runs]
        lines.append(
            [
                "machine noise: the static anchor's req/s spread over rounds, (max - min) / median",
                "(context)",
                f"{(max(values) - min(values)) / static.rps:.0%}",
                "",
            ]
        )
    lines.append(
        [
            f"no error and no hang, Graft, {args.connections} connections (all rows)"
            + (f" and sweep {', '.join(f'{c:,}' for c in args.sweep)} connections" if args.sweep else ""),
            "none",
            "none" if clean else "errors or hangs (tables)",
            verdict(clean),
        ]
    )
    target_table = markdown_table(["target", "wanted", "measured", "verdict"], lines)
    sweep_table = markdown_table(
        [
            "connections",
            "req/s",
            "p50",
            "p99",
            "max",
            "errors / hangs",
            "longest silence",
            "/healthz answers after",
            CPU_HEADER,
            "server log",
        ],
        [
            [
                str(row.connections),
                "**server did not start**",
                "",
                "",
                "",
                "",
                "",
                "",
                row.log,
            ]
            if not row.runs
            else [
                str(row.connections),
                fmt_rps(row.runs[0].rps),
                fmt_ms(row.runs[0].p50_ms),
                fmt_ms(row.runs[0].p99_ms),
                fmt_ms(row.runs[0].max_ms),
                row.runs[0].problems,
                f"{row.runs[0].silence_s:.2f} s",
                "yes" if row.runs[0].answered_after == 200 else f"**no** ({row.runs[0].answered_after})",
                cpu_cell(row.runs),
                row.log,
            ]
            for row in r.sweep
        ],
    )
    notes = []
    for row in [*r.rows, *r.sweep]:
        extra = [f"warm-up: {w.problems}" for w in row.warmups if w.problems != "none"]
        for stop, log in zip(row.stops, row.logs, strict=False):
            if stop and not stop.startswith("stopped"):
                log_lines = (ROOT / log).read_text(errors="replace").splitlines()
                last = f" (its log's last line: `{log_lines[-1].strip()}`)" if log_lines else ""
                extra.append(f"shutdown: {stop}{last}")
        if row.log_notes or extra:
            notes.append(f"- `{row.label}` ({row.log}): " + "; ".join([*sorted(set(extra)), *row.log_notes]))
    notes_text = "\n".join(notes) if notes else "- nothing logged at WARNING or above, no tracebacks"
    anchors = (
        f"anchor: bench/api_anchors.py, a bare FastAPI app, asyncpg pool min {POOL_MIN} / max {POOL_MAX} "
        "(Graft's own pool settings are in the header)"
        if r.name == "postgresql"
        else "anchor: bench/api_anchors.py's static endpoint alone (no raw asyncpg anchor on SQLite)"
    )
    return f"""### {title}

{s["seconds"]:.0f} s to seed {sum(s["statuses"].values()):,} jobs of the bootstrap project ({mix}) and
{s["events"]} job events; {s["reports"]:,} succeeded jobs carry a report (mean {s["report_kib_mean"]:.1f} KiB
of JSON: learning curves per arm, seed and epoch, confusion matrices), {s["states"]} running or requeued jobs a
resume_state (mean {s["state_kib_mean"]:.1f} KiB); a job response is ~{s["job_response_bytes_median"]:,} bytes
(median), the static body the same. {anchors}. Load average (1/5/15 min) {r.load_before} before,
{r.load_after} after.

At {args.connections} connections. {args.runs} round{"s" if args.runs != 1 else ""}; each round runs every row once,
one after the other, each on a fresh server: start, {args.warmup:g} s of warm-up, one run of {args.duration:g} s, stop.
Medians over the rounds:

{table}

Targets (reported, not asserted):

{target_table}

Response shape: {r.shape_check}.

Graft `GET /v1/jobs/{{id}}` at increasing concurrency, one run of {args.sweep_duration:g} s per level, a fresh server
per level (warm-up {min(args.warmup, 2):g} s at up to 10 connections):

{sweep_table}

Server logs (WARNING and above, tracebacks' exceptions; job ids elided):

{notes_text}
"""


def markdown(results: list[BackendResult], args: argparse.Namespace, info: dict[str, Any], logs: Path) -> str:
    v = info["versions"]
    libs = ", ".join(f"{name} {version}" for name, version in v.items())
    body = "\n".join(backend_markdown(r, args) for r in results)
    return f"""## API under load: job-status polling

- Command: `{info["command"]}` (Graft at {info["revision"]})
- Date: {info["date"]}
- Machine: {info["cpu"]}, {info["cores"]} cores, {info["ram_gib"]:.1f} GiB RAM; Python {info["python"]};
  {libs}; PostgreSQL {info["postgres"]}; Redis at {REDIS}; {info["wrk"]}
- Servers: each its own process, one uvicorn worker on 127.0.0.1, started for one run alone and stopped after it:
  Graft exactly as docker-compose runs it (`python -m app.cli api`, i.e. `uvicorn app.main:app
  --no-access-log`) with GRAFT_RATE_LIMIT_PER_MINUTE=0 (the per-key rate limit is a feature, not what is
  measured: at its default of 1,200 a minute a single key polling this fast would be answered 429) and the
  reaper at its default interval ({info["reaper_interval"]:g} s), its database pools at their defaults
  ({info["graft_pools"]}); the anchors `uvicorn bench.api_anchors:app
  --no-access-log`. No Celery worker runs; queued jobs have their message in the broker on a queue no worker
  consumes, running jobs' leases are set ahead so the reaper leaves them be.
- Load: wrk `-t1` (the machine's cores are shared by server and client), `--timeout {WRK_TIMEOUT_S}s
  --latency`, a Lua script sending `Authorization: Bearer <admin key>` and a random one of the
  {args.jobs:,} job ids per request. An error is any non-2xx response or socket error (connect, read, write,
  timeout); a hang is a run in which nothing was answered, or no connection got any response for
  {STALL_S:g} s or more ("longest silence": the longest such gap, the last response to the end of the run
  included). "/healthz answers after" probes the server (3 s
  timeout) right after each run. CPU: core-seconds over the run's seconds (of {info["cores"]} cores) used by
  the server process, all PostgreSQL processes, wrk, and everything else on the machine (other work on
  this shared machine: its share says how noisy the run was).
- File-descriptor limit {info["nofile"]} (raised for this process, wrk and the servers).
- Server logs: {rel(logs)}/; this run's full results: {info["json"]}

{body}"""


# ---------------------------------------------------------------- main


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--backend", choices=["postgresql", "sqlite", "both"], default="both")
    parser.add_argument("--runs", type=int, default=3, help="runs per row at --connections")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per run")
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds of load before the runs of a row")
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument(
        "--sweep",
        type=lambda s: [int(x) for x in s.split(",") if x],
        default=[1, 10, 50, 200, 1000],
        help="connection counts of the sweep, comma-separated ('' for none)",
    )
    parser.add_argument("--sweep-duration", type=float, default=5.0)
    parser.add_argument("--jobs", type=int, default=10_000)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    nofile = raise_fd_limit()
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    logs = OUT / f"api-{stamp}"
    logs.mkdir(parents=True, exist_ok=True)
    json_path = OUT / f"api-{stamp}.json"
    from graft.config import Settings

    m = machine()
    info = {
        "command": command_line("bench.api"),
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": m.cpu,
        "cores": m.cores,
        "ram_gib": m.ram_gib,
        "python": platform.python_version(),
        "versions": versions(),
        "postgres": postgres_version(),
        "wrk": wrk_version(),
        "nofile": nofile,
        "reaper_interval": Settings.model_fields["reaper_interval_seconds"].default,
        "revision": graft_revision(),
        "graft_pools": ", ".join(
            f"{name}={f.default}" for name, f in Settings.model_fields.items() if "pool" in name
        )
        or "none configurable",
        "json": rel(json_path),
    }
    names = ["postgresql", "sqlite"] if args.backend == "both" else [args.backend]
    rng = random.Random(0)
    results: list[BackendResult] = []
    harness_failures: list[str] = []
    for name in names:
        try:
            results.append(run_backend(name, args, logs, rng))
        except Exception as exc:  # setup failed (database, migrations, seeding): a harness failure
            harness_failures.append(f"{name}: {type(exc).__name__}: {exc}")
            print(f"HARNESS FAILURE on {name}: {type(exc).__name__}: {exc}", flush=True)
    for r in results:
        for row in [*r.rows, *r.sweep]:
            if row.start_error:
                harness_failures.append(f"{r.name} {row.label}: server did not start")
            harness_failures += [
                f"{r.name} {row.label}: {x.harness_error}" for x in row.runs if x.harness_error
            ]
    text = markdown(results, args, info, logs)
    if harness_failures:
        text += "\nHarness failures:\n\n" + "\n".join(f"- {f}" for f in harness_failures) + "\n"
    print("\n" + text)
    payload = {
        "info": info,
        "args": vars(args),
        "results": [
            {
                **asdict(r),
                "rows": [asdict(x) | {"rps": x.rps, "p99_ms": x.p99} for x in r.rows],
                "sweep": [asdict(x) for x in r.sweep],
            }
            for r in results
        ],
        "harness_failures": harness_failures,
        "markdown": text,
    }
    json_path.write_text(json.dumps(payload, indent=1, default=str))
    json_path.with_suffix(".md").write_text(text)
    if not harness_failures and args.backend == "both":  # a full run is what docs/benchmarks.md records
        write_section("api", text)
        print("(written to docs/benchmarks.md, section api)")
    print(
        f"(results in {rel(json_path)} and {rel(json_path.with_suffix('.md'))}; server logs in {rel(logs)}/)"
    )
    return 1 if harness_failures else 0


if __name__ == "__main__":
    sys.exit(main())
