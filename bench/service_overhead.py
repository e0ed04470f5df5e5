"""Benchmark: fine-tuning jobs through the real service against a minimal hand-written PyTorch loop with
the same model, data, hyperparameters and seeds.

The service runs as the end-to-end tests run it: a temporary GRAFT_HOME (embedded SQLite, filesystem
broker), `prestart`, then the `api_command` (uvicorn) and `worker_command` (Celery) processes, driven over
HTTP. The worker gets as many torch threads as this process has. Service and hand runs alternate, one
seed per pair. Measured:

- training time: the sum of a job's per-epoch `epoch_seconds` (its metrics events; each epoch is the
  train steps and a validation pass) against the hand loop's epochs doing exactly that, on the same split,
  with images decoded once up front to uint8 (prepare_image) and normalised per batch (images_to_tensor);
- latency: submit (POST /v1/jobs returning) to the first training step, polled every 20 ms on GET
  /v1/jobs/{id} until progress.step >= 1, for the worker's first job (cold) and later ones (warm), with the
  server's own event timestamps to break it down; and the last epoch to `succeeded`;
- accuracy: the job's val_accuracy (its best epoch) against the hand loop's (best epoch, same rule).

    .venv/bin/python -m bench.service_overhead [--runs 3] [--skip-text]
"""

from __future__ import annotations

import argparse
import csv
import io
import math
import re
import tempfile
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from bench.common import (
    LoopHyperparameters,
    best_val_accuracy,
    command_line,
    hand_train,
    markdown_table,
    mean_std,
    median,
    report,
    review_rows,
    runs_list,
    seconds,
)
from bench.live_service import TERMINAL, Service, service
from graft.catalog import BUILTIN_MODELS
from graft.spec import ModelSpec
from ml.data import stratified_split
from ml.networks import build_model
from ml.preprocess import TextPipeline, images_to_tensor, prepare_image
from tests.helpers import Api, digits_zip, text_csv

NAME = "service_overhead"
FIRST_STEP_POLL = 0.02  # seconds between polls until the first step shows
TRAINING_POLL = 1.0  # then rarely, so the client takes (almost) no CPU from the training


@dataclass(frozen=True)
class Workload:
    model: str
    description: str
    task: str
    filename: str
    data: bytes
    hp: LoopHyperparameters


def workloads(skip_text: bool) -> list[Workload]:
    split = 0.2
    chosen = [
        Workload(
            model="cnn-small",
            description="cnn-small full, 600 digit images (10 classes)",
            task="image_classification",
            filename="digits.zip",
            data=digits_zip(600, classes=range(10), seed=0),
            hp=LoopHyperparameters(epochs=8, batch_size=32, learning_rate=2e-3, validation_split=split),
        )
    ]
    if not skip_text:
        chosen.append(
            Workload(
                model="minilm-l6",
                description="minilm-l6 full, 400 review sentences (2 classes)",
                task="text_classification",
                filename="reviews.csv",
                data=text_csv(review_rows(400, seed=2)),
                hp=LoopHyperparameters(epochs=2, batch_size=16, learning_rate=5e-5, validation_split=split),
            )
        )
    return chosen


def timestamp(value: str) -> float:
    moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp()


def all_events(api: Api, job_id: str) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []
    after = ""
    while True:
        page = api.get(f"/v1/jobs/{job_id}/events?limit=100{after}").json()
        events += page["data"]
        if not page["has_more"]:
            return events
        after = f"&after={page['data'][-1]['id']}"


@dataclass(frozen=True)
class ServiceRun:
    seed: int
    epoch_seconds: list[float]
    val_accuracy: float
    first_step_polled: float  # POST returned -> a GET shows progress.step >= 1
    received: float  # POST returned -> the worker logs "Task ... received" (the broker's delivery)
    claimed: float  # POST returned -> "Job started" (the worker claimed the job in the database)
    setup: float  # "Job started" -> "Training ..." (imports, model build, data read, tokenising)
    step: float  # one training step (the first epoch's seconds over its steps)
    between_epochs: float  # "Training ..." -> last metrics event, less the epochs (checkpoints, writes)
    finish: float  # last metrics event -> finished_at (last checkpoint, best weights, registering)
    wall: float  # started_at -> finished_at

    @property
    def first_step_server(self) -> float:
        """Submit to the end of the first step from the server's timestamps (the progress the API shows
        is written at most once a second, so polling sees a step late)."""
        return self.claimed + self.setup + self.step


RECEIVED = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}): .*\] received$")


def last_received(worker_log: Path) -> float:
    """When the worker last logged a task as received (its log's local time, this machine's clock)."""
    stamps = [
        m.group(1) for m in map(RECEIVED.match, worker_log.read_text(errors="replace").splitlines()) if m
    ]
    return datetime.strptime(stamps[-1], "%Y-%m-%d %H:%M:%S,%f").timestamp()


def service_run(svc: Service, workload: Workload, dataset_id: str, seed: int) -> ServiceRun:
    api = svc.api
    body = {
        "base_model": workload.model,
        "training_dataset": dataset_id,
        "method": "full",
        "hyperparameters": workload.hp.as_job(),
        "seed": seed,
    }
    created = api.create_job(body)
    submitted = time.time()
    if created.status_code != 201:
        raise RuntimeError(f"POST /v1/jobs answered {created.status_code}: {created.text}")
    job_id = created.json()["id"]
    first_step: float | None = None
    while True:
        job = api.get(f"/v1/jobs/{job_id}").json()
        if first_step is None and (job.get("progress") or {}).get("step", 0) >= 1:
            first_step = time.time() - submitted
        if job["status"] in TERMINAL:
            break
        time.sleep(FIRST_STEP_POLL if first_step is None else TRAINING_POLL)
    if job["status"] != "succeeded":
        raise RuntimeError(f"job {job_id} {job['status']}: {job.get('error')}\n{svc.logs()}")
    events = all_events(api, job_id)
    metrics = [e for e in events if e["type"] == "metrics"]
    epoch_seconds = [float(e["data"]["epoch_seconds"]) for e in metrics]

    def when(prefix: str) -> float:
        return timestamp(next(e["created_at"] for e in events if e["message"].startswith(prefix)))

    training = when("Training ")
    last_epoch = timestamp(metrics[-1]["created_at"])
    steps = math.ceil(job["progress"]["total_steps"] / workload.hp.epochs)
    return ServiceRun(
        seed=seed,
        epoch_seconds=epoch_seconds,
        val_accuracy=float(job["metrics"]["val_accuracy"]),
        first_step_polled=first_step if first_step is not None else math.nan,
        received=last_received(svc.worker_log) - submitted,
        claimed=when("Job started") - submitted,
        setup=training - when("Job started"),
        step=epoch_seconds[0] / steps,
        between_epochs=last_epoch - training - sum(epoch_seconds),
        finish=timestamp(job["finished_at"]) - last_epoch,
        wall=timestamp(job["finished_at"]) - timestamp(job["started_at"]),
    )


# ---------------------------------------------------------------- the hand-written loop


@dataclass
class Prepared:
    """A dataset ready for the hand loop: labels, and a function from example indices to a batch."""

    labels: list[str]
    batch: Callable[[list[int]], Any]
    seconds: float  # decoding or tokenising everything, once


def prepare(workload: Workload) -> Prepared:
    spec = ModelSpec.for_builtin(workload.model)
    started = time.perf_counter()
    if workload.task == "image_classification":
        with zipfile.ZipFile(io.BytesIO(workload.data)) as archive:
            names = sorted(name for name in archive.namelist() if not name.endswith("/"))
            pixels = torch.from_numpy(
                np.stack([prepare_image(archive.read(n), spec.input_spec) for n in names])
            )
        labels = [name.split("/")[0] for name in names]

        def image_batch(indices: list[int]) -> Tensor:
            return images_to_tensor(pixels[indices], spec.input_spec)

        return Prepared(labels, image_batch, time.perf_counter() - started)
    rows = csv_rows(workload.data)
    pipeline = TextPipeline(spec)
    token_ids = pipeline.tokenize([text for text, _ in rows])

    def text_batch(indices: list[int]) -> dict[str, Tensor]:
        return pipeline.collate([token_ids[i] for i in indices])

    return Prepared([label for _, label in rows], text_batch, time.perf_counter() - started)


def csv_rows(data: bytes) -> list[tuple[str, str]]:
    reader = csv.reader(io.StringIO(data.decode()))
    next(reader)  # the header
    return [(text, label) for text, label in reader]


@dataclass(frozen=True)
class HandRun:
    seed: int
    epoch_seconds: list[float]
    val_accuracy: float


def hand_run(workload: Workload, prepared: Prepared, classes: list[str], seed: int) -> HandRun:
    torch.manual_seed(seed)  # as the recipe seeds: same initial weights, dropout masks and batch order
    generator = torch.Generator()
    generator.manual_seed(seed)
    spec = ModelSpec.for_builtin(workload.model).with_classes(classes)
    model = build_model(spec, pretrained=BUILTIN_MODELS[workload.model].pretrained)
    labels = torch.tensor([classes.index(label) for label in prepared.labels])
    train_idx, val_idx = stratified_split(labels, workload.hp.validation_split, seed)

    def logits(indices: list[int], train: bool) -> Tensor:
        examples = train_idx if train else val_idx
        return model(prepared.batch([examples[i] for i in indices]))

    history = hand_train(model, logits, labels[train_idx], labels[val_idx], workload.hp, generator)
    return HandRun(
        seed=seed,
        epoch_seconds=[e.seconds for e in history],
        val_accuracy=best_val_accuracy([(e.val_accuracy, e.val_loss) for e in history]),
    )


# ---------------------------------------------------------------- the report


@dataclass
class Result:
    workload: Workload
    service: list[ServiceRun]
    hand: list[HandRun]
    prepare_seconds: float
    n_val: int


def training_rows(results: list[Result]) -> list[list[str]]:
    rows = []
    for r in results:
        svc = [sum(s.epoch_seconds) for s in r.service]
        hand = [sum(h.epoch_seconds) for h in r.hand]
        svc_later = [sum(s.epoch_seconds[1:]) for s in r.service]
        hand_later = [sum(h.epoch_seconds[1:]) for h in r.hand]
        ratio = median(svc) / median(hand)
        later = median(svc_later) / median(hand_later) if r.workload.hp.epochs > 1 else math.nan
        pairs = [a / b for a, b in zip(svc, hand, strict=True)]
        spread = (max(hand) - min(hand)) / median(hand)
        rows.append(
            [
                r.workload.description,
                f"{seconds(median(svc))} ({runs_list(svc)})",
                f"{seconds(median(hand))} ({runs_list(hand)})",
                f"**{ratio:.3f}** ({'meets' if ratio <= 1.10 else 'misses'} ≤ 1.10)",
                runs_list(pairs, digits=3),
                f"{later:.3f}",
                f"{spread:.0%}",
            ]
        )
    return rows


def latency_rows(results: list[Result]) -> list[list[str]]:
    rows = []
    first = True
    for r in results:
        for i, s in enumerate(r.service):
            kind = (
                "cold (worker's first job)"
                if first
                else ("warm, first job of this model" if i == 0 else "warm")
            )
            first = False
            rows.append(
                [
                    f"{r.workload.model} seed {s.seed}",
                    kind,
                    seconds(s.first_step_polled),
                    seconds(s.first_step_server),
                    seconds(s.received),
                    seconds(s.claimed - s.received),
                    seconds(s.setup),
                    seconds(s.step),
                    seconds(s.between_epochs),
                    seconds(s.finish),
                    f"{seconds(s.wall)} / {seconds(sum(s.epoch_seconds))}",
                ]
            )
    return rows


def accuracy_rows(results: list[Result]) -> list[list[str]]:
    rows = []
    for r in results:
        svc = [s.val_accuracy for s in r.service]
        hand = [h.val_accuracy for h in r.hand]
        (m_s, sd_s), (m_h, sd_h) = mean_std(svc), mean_std(hand)
        k = len(svc)
        seed_noise = math.sqrt((sd_s**2 + sd_h**2) / k)
        # An accuracy on n_val examples is never known better than its sampling error.
        sampling = math.sqrt(2 * m_s * (1 - m_s) / r.n_val / k) if 0 < m_s < 1 else 0.0
        noise = max(seed_noise, sampling)
        diff = m_s - m_h
        same = "identical per seed" if svc == hand else ("yes" if abs(diff) <= 2 * noise else "**no**")
        rows.append(
            [
                r.workload.description,
                f"{m_s:.4f} ± {sd_s:.4f} ({runs_list(svc, digits=4)})",
                f"{m_h:.4f} ± {sd_h:.4f} ({runs_list(hand, digits=4)})",
                f"{diff:+.4f}",
                f"{noise:.4f}",
                same,
            ]
        )
    return rows


def body(results: list[Result], runs: int, threads: int) -> str:
    described = "\n".join(
        f"- {r.workload.description}: {r.workload.hp.epochs} epochs, batch size {r.workload.hp.batch_size}, "
        f"learning rate {r.workload.hp.learning_rate:g}, weight decay {r.workload.hp.weight_decay:g}, warm-up "
        f"{r.workload.hp.warmup_ratio:g}, clipping {r.workload.hp.max_grad_norm:g}, validation_split "
        f"{r.workload.hp.validation_split:g} ({r.n_val} validation examples); the hand loop decoded or "
        f"tokenised the data once in {seconds(r.prepare_seconds)} (not in its epochs)."
        for r in results
    )
    seeds = ", ".join(str(s.seed) for s in results[0].service)
    training = markdown_table(
        [
            "workload",
            f"service Σ epoch_seconds, median ({runs} runs)",
            f"hand loop Σ epochs, median ({runs} runs)",
            "ratio service/hand (medians)",
            "ratio per pair",
            "ratio without epoch 1",
            "hand loop spread (max-min)/median",
        ],
        training_rows(results),
    )
    latency = markdown_table(
        [
            "job",
            "worker",
            "submit → step ≥ 1 seen (20 ms polls)",
            "submit → first step (server clock)",
            "submit → received (broker)",
            "received → claimed",
            "setup",
            "one step",
            "between epochs",
            "last epoch → succeeded",
            "job wall / Σ epochs",
        ],
        latency_rows(results),
    )
    accuracy = markdown_table(
        [
            "workload",
            f"service val_accuracy, mean ± std (seeds {seeds})",
            "hand loop val_accuracy",
            "difference",
            "noise (1 s.e.)",
            "equal within noise (abs diff ≤ 2 s.e.)?",
        ],
        accuracy_rows(results),
    )
    return f"""
Service (uvicorn + Celery worker processes, embedded SQLite and filesystem broker, default settings,
worker with GRAFT_TORCH_THREADS={threads}) against a hand-written loop in the benchmark process
({threads} torch threads). Runs alternate service, hand, one seed per pair (seeds {seeds}); medians.

{described}

### Training time

Σ of the per-epoch `epoch_seconds` of the job's metrics events (train steps + validation pass) against
the hand loop's epochs measured the same way. "Ratio per pair" divides each service run by the hand run
that followed it (same seed); "without epoch 1" compares the medians of epochs 2 onwards. The hand loop's
spread over its own identical-cost runs shows the machine's run-to-run noise, against which the 10%
target has to be read.

{training}

### Latency of a job

From the client: POST /v1/jobs returning → a GET /v1/jobs/{{id}} (every 20 ms) showing progress.step ≥ 1.
From the server's timestamps (same clock): received = the worker logs the task as received (the
filesystem broker's delivery); claimed = the "Job started" event (the task has imported the runner and
claimed the job in the database); setup = "Job started" → "Training …" (model build, data read); one
step = epoch 1's seconds over its steps; between epochs = "Training …" → last metrics event, less the
epochs (checkpoints and database writes); last epoch → succeeded = last metrics event → finished_at (last
checkpoint, best weights, saving and registering the model).

{latency}

### Accuracy

Validation accuracy of the best epoch (Graft's rule, the same in the hand loop); each seed fixes the
split, the initial weights and the batch order on both sides. Noise: the standard error of the
difference of the means over seeds, never below the sampling error of an accuracy on the validation set.

{accuracy}
"""


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=3, help="service jobs and hand runs per workload")
    parser.add_argument("--skip-text", action="store_true", help="only the cnn-small workload")
    args = parser.parse_args()
    threads = torch.get_num_threads()
    chosen = workloads(args.skip_text)
    seeds = list(range(1, args.runs + 1))
    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="graft-bench-home-") as home:
        started = time.perf_counter()
        with service(Path(home), threads) as svc:
            print(f"service up in {time.perf_counter() - started:.1f} s", flush=True)
            for workload in chosen:
                dataset = svc.api.upload_ok(workload.data, workload.filename, workload.task)
                classes = list(dataset["classes"])
                prepared = prepare(workload)
                result = Result(workload, [], [], prepared.seconds, 0)
                for seed in seeds:
                    result.service.append(service_run(svc, workload, dataset["id"], seed))
                    s = result.service[-1]
                    print(
                        f"{workload.model} seed {seed}: service Σepochs {sum(s.epoch_seconds):.2f} s, "
                        f"first step {s.first_step_polled:.2f} s, val_accuracy {s.val_accuracy:.4f}",
                        flush=True,
                    )
                    result.hand.append(hand_run(workload, prepared, classes, seed))
                    h = result.hand[-1]
                    print(
                        f"{workload.model} seed {seed}: hand Σepochs {sum(h.epoch_seconds):.2f} s, "
                        f"val_accuracy {h.val_accuracy:.4f}",
                        flush=True,
                    )
                labels = torch.tensor([classes.index(label) for label in prepared.labels])
                result.n_val = len(stratified_split(labels, workload.hp.validation_split, seeds[0])[1])
                results.append(result)
    report(
        NAME,
        "Service overhead (finetune, method full)",
        command_line("bench.service_overhead"),
        body(results, args.runs, threads),
    )


if __name__ == "__main__":
    main()
