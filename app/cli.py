"""Command line: `python -m app.cli {run,prestart,api,worker}`.

- `prestart`: apply migrations and make sure the default project and the operator's key exist;
  `prestart --new-operator-key` makes a new operator key (after the old one was revoked or lost);
- `run`: prestart, then the API and one worker side by side (what `make run` does); Ctrl-C stops both;
- `api` / `worker`: one process each, for docker-compose and clusters.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING

from graft.config import Settings, get_settings

if TYPE_CHECKING:
    from app.projects.service import Bootstrap

ROOT = Path(__file__).resolve().parents[1]


def migrate(settings: Settings) -> None:
    from alembic import command
    from alembic.config import Config

    config = Config(str(ROOT / "alembic.ini"))
    config.set_main_option("script_location", str(ROOT / "migrations"))
    config.set_main_option("sqlalchemy.url", settings.effective_database_url.replace("%", "%%"))
    config.attributes["configure_logging"] = False
    command.upgrade(config, "head")


def new_key_command() -> str:
    """How to make a new operator key, as the person at this terminal types it (`make run` users have no
    virtual environment activated: the interpreter is named)."""
    python = sys.executable
    relative = os.path.relpath(python)
    return f"{relative if not relative.startswith('..') else python} -m app.cli prestart --new-operator-key"


def bootstrap(settings: Settings) -> Bootstrap:
    """Migrate, and make sure the default project and the operator's key exist."""
    from app.projects.service import bootstrap as ensure_bootstrap
    from graft.db import make_engine, make_session_factory, session_scope

    settings.home.mkdir(parents=True, exist_ok=True)
    migrate(settings)
    engine = make_engine(settings.effective_database_url)
    try:
        with session_scope(make_session_factory(engine)) as session:
            result = ensure_bootstrap(session, settings)
            if result.created and result.key is not None:
                print(
                    f"Created the operator API key of this instance (project {result.project.id}).",
                    flush=True,
                )
            if result.revoked:
                print(
                    "The operator API key "
                    + (
                        "in GRAFT_BOOTSTRAP_API_KEY"
                        if result.key is None
                        else f"in {settings.admin_key_file}"
                    )
                    + f" was revoked. Make a new one with `{new_key_command()}` (it replaces "
                    f"{settings.admin_key_file}).",
                    flush=True,
                )
            return result
    finally:
        engine.dispose()


def prestart(settings: Settings) -> str | None:
    """Migrate and bootstrap; returns the operator key when Graft generated it and it is valid (None when it
    came from the environment, which Graft never echoes, or was revoked)."""
    result = bootstrap(settings)
    return None if result.revoked else result.key


def new_operator_key(settings: Settings) -> str:
    from app.projects.service import new_operator_key as make_key
    from graft.db import make_engine, make_session_factory, session_scope

    migrate(settings)
    engine = make_engine(settings.effective_database_url)
    try:
        with session_scope(make_session_factory(engine)) as session:
            key = make_key(session, settings).key
            assert key is not None
            return key
    finally:
        engine.dispose()


def recover_embedded_jobs(settings: Settings) -> None:
    """Embedded mode has exactly one worker, started by `run`: a job left running was interrupted by the
    last stop (not waiting for its lease to expire), so it goes back to the queue; every queued job is sent
    again (a delivery of a job that already started is a no-op, so duplicates are harmless)."""
    from graft import job_store
    from graft.db import make_engine, make_session_factory, session_scope
    from graft.queueing import JobQueue

    engine = make_engine(settings.effective_database_url)
    try:
        with session_scope(make_session_factory(engine)) as session:
            job_store.requeue_interrupted(
                session,
                "The service stopped while this job ran; it was queued again and resumes from its last saved "
                "training state",
            )
            queued = job_store.queued(session)
    finally:
        engine.dispose()
    queue = JobQueue(settings)
    for job_id in queued:
        queue.send(job_id)


def api_command(settings: Settings) -> list[str]:
    return [
        sys.executable, "-m", "uvicorn", "app.main:app",
        "--host", settings.host, "--port", str(settings.port), "--no-access-log",
    ]  # fmt: skip


def worker_command(settings: Settings) -> list[str]:
    command = [
        sys.executable, "-m", "celery", "-A", "workers.celery_app", "worker",
        "--queues", settings.worker_queue, "--concurrency", str(settings.worker_concurrency),
        "--loglevel", "INFO", "--hostname", f"graft-{settings.worker_queue}@%h",
    ]  # fmt: skip
    if settings.uses_filesystem_broker:
        command += ["--without-mingle", "--without-gossip", "--without-heartbeat"]
    return command


def _wait_until_up(url: str, process: subprocess.Popen[bytes], timeout: float = 120.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return True
        except OSError:
            time.sleep(0.3)
    return False


# A worker that dies is started again, unless it died more than this many times within the window: then
# it cannot stay up (a broken install, a bad setting) and Graft stops with the reason instead of looping.
WORKER_RESTART_LIMIT = 3
WORKER_RESTART_WINDOW_SECONDS = 60.0


class _WorkerDeaths:
    """The worker's deaths within the last window."""

    def __init__(self) -> None:
        self.times: collections.deque[float] = collections.deque()

    def record(self) -> bool:
        """Count a death; True when the worker died too often to start it again."""
        now = time.monotonic()
        self.times.append(now)
        while now - self.times[0] > WORKER_RESTART_WINDOW_SECONDS:
            self.times.popleft()
        return len(self.times) > WORKER_RESTART_LIMIT


def _describe_exit(code: int) -> str:
    if code < 0:
        return f"killed by {signal.Signals(-code).name}"
    return f"exit status {code}"


def _key_revoked(settings: Settings, key: str) -> bool:
    from sqlalchemy import select

    from app.core.security import key_lookup
    from graft.db import make_engine
    from graft.tables import ApiKey

    engine = make_engine(settings.effective_database_url)
    try:
        with engine.connect() as connection:
            revoked_at = connection.scalar(select(ApiKey.revoked_at).where(ApiKey.lookup == key_lookup(key)))
        return revoked_at is not None
    finally:
        engine.dispose()


def run(settings: Settings) -> int:
    key = prestart(settings)
    # prestart shows no key when it came from GRAFT_BOOTSTRAP_API_KEY or was revoked: tell them apart.
    env_key = settings.bootstrap_api_key
    revoked = key is None and (env_key is None or _key_revoked(settings, env_key.get_secret_value()))
    embedded = settings.database_url is None and settings.uses_filesystem_broker
    if embedded:
        recover_embedded_jobs(settings)
    env = {**os.environ, "GRAFT_HOME": str(settings.home)}
    # Own sessions: a terminal's Ctrl-C reaches only this launcher, which forwards one SIGTERM to each.
    api = subprocess.Popen(api_command(settings), env=env, start_new_session=True)
    worker = subprocess.Popen(worker_command(settings), env=env, start_new_session=True)
    processes = {"api": api, "worker": worker}
    stopping = False

    def stop(signum: int, _frame: object) -> None:
        nonlocal stopping
        if stopping:
            # A second Ctrl-C: stop now (the worker with its pool processes). An interrupted job is queued
            # again at the next start and resumes from its last finished epoch.
            for process in processes.values():
                if process.poll() is None:
                    with contextlib.suppress(OSError):
                        os.killpg(process.pid, signal.SIGKILL)
            return
        stopping = True
        print(
            "\nStopping Graft (a running job saves its training state and resumes at the next start; "
            "Ctrl-C again to force)...",
            flush=True,
        )
        for process in processes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)

    previous = {signum: signal.signal(signum, stop) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        base = f"http://{settings.host}:{settings.port}"
        if _wait_until_up(f"{base}/healthz", api):
            if revoked:
                shown = f"(revoked: make a new one with `{new_key_command()}`)"
            else:
                shown = key if key is not None else "(the value of GRAFT_BOOTSTRAP_API_KEY)"
            print(
                "\n"
                "  Graft is running\n"
                f"    API docs       {base}/docs\n"
                f"    Admin API key  {shown}\n"
                f"    Data           {settings.home}\n"
                "  Press Ctrl-C to stop.\n",
                flush=True,
            )
        # A worker that dies (killed, out of memory) is started again, and the job it ran resumes from its
        # last saved training state. The API ending (Ctrl-C, or a crash) brings the worker down with it, as
        # does a worker that keeps dying.
        deaths = _WorkerDeaths()
        reason = None
        while api.poll() is None and not stopping:
            time.sleep(0.5)
            worker = processes["worker"]
            if stopping or worker.poll() is None:  # a worker stopped by our own SIGTERM is no death
                continue
            with contextlib.suppress(OSError):
                os.killpg(worker.pid, signal.SIGKILL)  # pool processes it may have left behind
            exit_ = _describe_exit(worker.returncode)
            if deaths.record():
                reason = (
                    f"the worker exited {len(deaths.times)} times within {WORKER_RESTART_WINDOW_SECONDS:.0f} s "
                    f"(last: {exit_}); its log is above"
                )
                break
            print(
                f"The worker exited ({exit_}); starting it again. A job it was running resumes from its last "
                "saved training state.",
                flush=True,
            )
            if embedded:
                recover_embedded_jobs(settings)
            processes["worker"] = subprocess.Popen(worker_command(settings), env=env, start_new_session=True)
        if reason is None and not stopping:
            reason = f"the API process exited ({_describe_exit(api.returncode)}); its log is above"
        if not stopping:
            stop(signal.SIGTERM, None)
        for process in processes.values():
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if reason is not None:
        print(f"Graft stopped because {reason}.", file=sys.stderr, flush=True)
        return 1
    return 0


def _raise_open_files_limit(wanted: int = 65536) -> None:
    """Every client connection is an open file: the usual soft limit (1024) would refuse the thousandth.
    Raised to the hard limit (the processes started from here inherit it)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m app.cli", description="Graft service commands")
    parser.add_argument("command", choices=["run", "prestart", "api", "worker"])
    parser.add_argument(
        "--new-operator-key",
        action="store_true",
        help="prestart: make a new operator key (after the old one was revoked or lost), kept in "
        "$GRAFT_HOME/admin.key",
    )
    args = parser.parse_args(argv)
    settings = get_settings()
    _raise_open_files_limit()
    if args.command == "prestart":
        if args.new_operator_key:
            print(f"Operator API key (also in {settings.admin_key_file}): {new_operator_key(settings)}")
            return 0
        shown = prestart(settings)
        if shown is not None:
            print(f"Admin API key: {shown}")
        return 0
    if args.command == "run":
        return run(settings)
    command = api_command(settings) if args.command == "api" else worker_command(settings)
    os.execv(command[0], command)
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
