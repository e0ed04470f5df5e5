"""Benchmark: job creation under load. Many clients at once create jobs (`POST /v1/jobs`: each request's
kind planned, checked against its datasets, resolved into the kind's spec, committed and queued) against
ONE uvicorn worker, each polling the job it made, while a probe reads /healthz; on the embedded default
(SQLite, filesystem broker) and on PostgreSQL + Redis.

The baseline is the same service at another git revision (`--baseline`, by default the one before job
plans), run alternately with the current tree in the same script, each round on a fresh database: the
ratio says what the change costs on the request path. Nothing may be lost: every 201 must be a row.

    .venv/bin/python -m bench.job_creation --runs 3 --duration 10
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import secrets
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import sqlalchemy as sa

from bench.common import ROOT, command_line, markdown_table, median, section, write_section
from tests.helpers import Api, free_port, iris_csv, log_tail, shifted_table_csv, stop

NAME = "job_creation"
POSTGRES = "postgresql+psycopg://postgres@127.0.0.1:5432"
REDIS = "redis://127.0.0.1:6379/0"
DEFAULT_BASELINE = "73a8e79"  # main before each job had a plan of its runs (graft/plan.py)
TABULAR = "tabular_classification"


@dataclass
class Outcome:
    created: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    create_ms: list[float] = field(default_factory=list)
    poll_ms: list[float] = field(default_factory=list)
    health_ms: list[float] = field(default_factory=list)
    rows: int = 0
    seconds: float = 0.0

    def error(self, what: str) -> None:
        self.errors[what] = self.errors.get(what, 0) + 1


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


@contextmanager
def tree(revision: str | None) -> Iterator[Path]:
    """The repository root of the service to run: this tree, or `revision` exported from git."""
    if revision is None:
        yield ROOT
        return
    with tempfile.TemporaryDirectory(prefix="graft-bench-rev-") as temp:
        archive = subprocess.run(["git", "archive", revision], cwd=ROOT, check=True, capture_output=True)
        subprocess.run(["tar", "-x", "-C", temp], input=archive.stdout, check=True)
        yield Path(temp)


@contextmanager
def server(root: Path, backend: str) -> Iterator[tuple[Api, str]]:
    """The API of the tree at `root` (migrated and bootstrapped by its own prestart), one uvicorn worker on
    a fresh database; no Celery worker (the jobs stay queued, their messages on a queue nobody consumes)."""
    key = "graft_bench_" + secrets.token_hex(14)
    queue = f"graft-bench-{secrets.token_hex(4)}"
    database = f"graft_bench_{secrets.token_hex(4)}" if backend == "postgresql" else None
    with tempfile.TemporaryDirectory(prefix=f"graft-bench-jobs-{backend}-") as temp:
        home = Path(temp)
        env = {k: v for k, v in os.environ.items() if not k.startswith("GRAFT_")}
        port = free_port()
        env.update(
            {
                "GRAFT_HOME": str(home),
                "GRAFT_PORT": str(port),
                "GRAFT_HOST": "127.0.0.1",
                "GRAFT_WORKER_QUEUE": queue,
                "GRAFT_BOOTSTRAP_API_KEY": key,
                "GRAFT_RATE_LIMIT_PER_MINUTE": "0",
                "PYTHONUNBUFFERED": "1",
            }
        )
        if database is not None:
            import psycopg

            with psycopg.connect("postgresql://postgres@127.0.0.1:5432/postgres", autocommit=True) as conn:
                conn.execute(f'CREATE DATABASE "{database}"')
            env["GRAFT_DATABASE_URL"] = f"{POSTGRES}/{database}"
            env["GRAFT_BROKER_URL"] = REDIS
        url = env.get("GRAFT_DATABASE_URL", f"sqlite:///{home / 'graft.db'}")
        log = home / "api.log"
        try:
            # `python -m` puts the tree's root first on sys.path: its packages, not this checkout's, run.
            subprocess.run([sys.executable, "-m", "app.cli", "prestart"], cwd=root, env=env, check=True)
            command = [
                sys.executable,
                "-m",
                "uvicorn",
                "app.main:app",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
            ]
            with log.open("wb") as out:
                process = subprocess.Popen(
                    [*command, "--no-access-log"], cwd=root, env=env, stdout=out, stderr=subprocess.STDOUT
                )
            http = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60)
            try:
                deadline = time.monotonic() + 60
                while True:
                    if process.poll() is not None:
                        raise RuntimeError(f"the API exited\n{log_tail(log, 40)}")
                    try:
                        if http.get("/readyz").status_code == 200:
                            break
                    except httpx.HTTPError:
                        pass
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"the API did not start\n{log_tail(log, 40)}")
                    time.sleep(0.2)
                yield Api(http, key), url
            finally:
                http.close()
                stop(process, 30)
        finally:
            if database is not None:
                import psycopg

                with psycopg.connect(
                    "postgresql://postgres@127.0.0.1:5432/postgres", autocommit=True
                ) as conn:
                    conn.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
                import redis

                client = redis.Redis.from_url(REDIS)
                client.delete(queue)
                client.close()


def bodies(api: Api) -> list[dict[str, Any]]:
    """The requests the clients send in turn: a pretrain job, a finetune job and an adapt job, each
    on real uploaded tables (their planners read the datasets, check they fit, resolve the defaults)."""
    iris = api.upload_ok(iris_csv(), "iris.csv", TABULAR, label_column="species")
    source = api.upload_ok(shifted_table_csv(300, domain="source"), "source.csv", TABULAR)
    target = api.upload_ok(shifted_table_csv(300, domain="target", with_labels=False), "target.csv", TABULAR)
    return [
        {"type": "pretrain", "base_model": "mlp", "training_dataset": iris["id"]},
        {
            "type": "finetune",
            "base_model": "mlp",
            "training_dataset": iris["id"],
            "hyperparameters": {"epochs": 5},
        },
        {
            "type": "adapt",
            "base_model": "mlp",
            "source_dataset": source["id"],
            "target_dataset": target["id"],
            "methods": ["mmd", "coral"],
        },
    ]


async def load(
    base_url: str, key: str, requests: list[dict[str, Any]], clients: int, seconds: float
) -> Outcome:
    outcome = Outcome()
    headers = {"Authorization": f"Bearer {key}"}
    limits = httpx.Limits(max_connections=clients + 2, max_keepalive_connections=clients + 2)
    async with httpx.AsyncClient(base_url=base_url, headers=headers, timeout=30, limits=limits) as http:
        stop_at = time.perf_counter() + seconds

        async def timed(
            request: Any, latencies: list[float], expected: int, what: str
        ) -> httpx.Response | None:
            """The response, its latency recorded; None (and an error counted) on a socket error or another
            status than `expected`."""
            started = time.perf_counter()
            try:
                response = await request
            except httpx.HTTPError as exc:
                outcome.error(type(exc).__name__)
                return None
            latencies.append((time.perf_counter() - started) * 1000)
            if response.status_code != expected:
                outcome.error(f"{what} {response.status_code}")
                return None
            return response

        async def client(index: int) -> None:
            rng = random.Random(index)
            while time.perf_counter() < stop_at:
                body = {**rng.choice(requests), "seed": rng.randrange(2**32)}
                created = await timed(http.post("/v1/jobs", json=body), outcome.create_ms, 201, "POST")
                if created is None:
                    continue
                outcome.created += 1
                await timed(http.get(f"/v1/jobs/{created.json()['id']}"), outcome.poll_ms, 200, "GET")

        async def probe() -> None:
            while time.perf_counter() < stop_at:
                started = time.perf_counter()
                try:
                    response = await http.get("/healthz")
                    if response.status_code != 200:
                        outcome.error(f"healthz {response.status_code}")
                except httpx.HTTPError as exc:
                    outcome.error(f"healthz {type(exc).__name__}")
                outcome.health_ms.append((time.perf_counter() - started) * 1000)
                await asyncio.sleep(0.1)

        started = time.perf_counter()
        await asyncio.gather(*(client(i) for i in range(clients)), probe())
        outcome.seconds = time.perf_counter() - started
    return outcome


def one_run(root: Path, backend: str, clients: int, seconds: float) -> Outcome:
    with server(root, backend) as (api, url):
        requests = bodies(api)
        for body in requests:  # each kind is accepted before the load starts
            response = api.post("/v1/jobs", json=body)
            assert response.status_code == 201, response.text
        outcome = asyncio.run(load(str(api.http.base_url), api.key, requests, clients, seconds))
        engine = sa.create_engine(url)
        with engine.connect() as connection:
            outcome.rows = int(connection.execute(sa.text("SELECT count(*) FROM jobs")).scalar_one()) - len(
                requests
            )
        engine.dispose()
    return outcome


def summarise(outcomes: list[Outcome]) -> dict[str, float]:
    return {
        "per_second": median([o.created / o.seconds for o in outcomes]),
        "create_p50": median([percentile(o.create_ms, 0.5) for o in outcomes]),
        "create_p99": median([percentile(o.create_ms, 0.99) for o in outcomes]),
        "poll_p50": median([percentile(o.poll_ms, 0.5) for o in outcomes]),
        "health_max": max(max(o.health_ms, default=0.0) for o in outcomes),
        "errors": sum(sum(o.errors.values()) for o in outcomes),
        "lost": sum(o.created - o.rows for o in outcomes),
        "created": sum(o.created for o in outcomes),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=["sqlite", "postgresql", "both"], default="both")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--baseline", default=DEFAULT_BASELINE, help="git revision to compare with")
    args = parser.parse_args()
    backends = ["sqlite", "postgresql"] if args.backend == "both" else [args.backend]
    head = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
    ).stdout
    rows = []
    with tree(args.baseline) as baseline_root:
        for backend in backends:
            results: dict[str, list[Outcome]] = {"current": [], "baseline": []}
            for run in range(args.runs):  # alternate, so that drift on the machine hits both alike
                for name, root in (("current", ROOT), ("baseline", baseline_root)):
                    outcome = one_run(root, backend, args.clients, args.duration)
                    results[name].append(outcome)
                    print(
                        f"{backend} {name} run {run + 1}: {outcome.created / outcome.seconds:.1f} jobs/s, "
                        f"POST p50 {percentile(outcome.create_ms, 0.5):.0f} ms p99 "
                        f"{percentile(outcome.create_ms, 0.99):.0f} ms, errors {outcome.errors}, "
                        f"rows {outcome.rows}/{outcome.created}",
                        flush=True,
                    )
            current, baseline = summarise(results["current"]), summarise(results["baseline"])
            for name, s in (("this tree", current), (f"baseline {args.baseline}", baseline)):
                rows.append(
                    [
                        backend,
                        name,
                        f"{s['per_second']:.1f}",
                        f"{s['create_p50']:.0f} / {s['create_p99']:.0f}",
                        f"{s['poll_p50']:.1f}",
                        f"{s['health_max']:.0f}",
                        f"{int(s['errors'])}",
                        f"{int(s['lost'])} of {int(s['created'])}",
                    ]
                )
            rows.append(
                [
                    backend,
                    "ratio (this tree / baseline)",
                    f"{current['per_second'] / baseline['per_second']:.2f}",
                    f"{current['create_p50'] / baseline['create_p50']:.2f} / "
                    f"{current['create_p99'] / baseline['create_p99']:.2f}",
                    f"{current['poll_p50'] / baseline['poll_p50']:.2f}",
                    "",
                    "",
                    "",
                ]
            )
    table = markdown_table(
        [
            "backend", "service", "jobs created / s", "POST /v1/jobs p50 / p99 ms", "GET its job p50 ms",
            "/healthz slowest ms", "errors", "lost (201 without a row)",
        ],
        rows,
    )  # fmt: skip
    body = (
        f"{args.clients} clients at once for {args.duration:g} s per run, {args.runs} runs per service alternating "
        f"(medians; errors and losses summed), this tree at {head.strip()} against {args.baseline}. Each client "
        "creates a job (at random: a pretrain job, a finetune job with epochs, an adapt job "
        "with two methods, each with a fresh seed, on uploaded tables), then reads it; a probe reads /healthz "
        "every 100 ms. One uvicorn worker (`uvicorn app.main:app`, rate limit off), a fresh database per run, "
        "no Celery worker (jobs stay queued). The clients (Python, httpx) share the 2 cores with the server.\n\n"
        + table
    )
    print(body)
    write_section(NAME, section("Job creation under load", command_line("bench.job_creation"), body))


if __name__ == "__main__":
    main()
