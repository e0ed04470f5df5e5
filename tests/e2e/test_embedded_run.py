"""`make run`'s launcher on the embedded default: SQLite, the filesystem broker and local storage under
GRAFT_HOME, a generated admin key, Ctrl-C that stops both processes, and a second start that reuses it all."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.e2e.conftest import free_port, log_tail
from tests.helpers import Api, iris_csv, wait_for

pytestmark = pytest.mark.e2e


def start(home: Path, port: int, log: Path) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GRAFT_")}
    env.update({"GRAFT_HOME": str(home), "GRAFT_PORT": str(port), "PYTHONUNBUFFERED": "1"})
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "app.cli", "run"], env=env, stdout=out, stderr=subprocess.STDOUT
        )


def wait_banner(process: subprocess.Popen[bytes], log: Path, count: int) -> str:
    def banner() -> bool:
        assert process.poll() is None, log_tail(log)
        return log.read_text(errors="replace").count("Graft is running") >= count

    wait_for(banner, 120, interval=0.5, message="the launcher's banner")
    return log.read_text(errors="replace")


def interrupt(process: subprocess.Popen[bytes], log: Path) -> int:
    process.send_signal(signal.SIGINT)  # what Ctrl-C sends
    try:
        return process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        raise AssertionError(f"the launcher did not stop on Ctrl-C\n{log_tail(log)}") from None


def test_run_serves_the_embedded_default_and_restarts_with_the_same_data(tmp_path: Path) -> None:
    home, log, port = tmp_path / "var", tmp_path / "run.log", free_port()
    launcher = start(home, port, log)
    try:
        output = wait_banner(launcher, log, 1)
        assert f"http://127.0.0.1:{port}/docs" in output
        printed = re.search(r"Admin API key\s+(graft_\S+)", output)
        assert printed, output
        key = printed.group(1)
        assert (home / "admin.key").read_text().strip() == key
        assert oct((home / "admin.key").stat().st_mode & 0o777) == "0o600"
        assert (home / "graft.db").exists() and (home / "broker").is_dir() and (home / "storage").is_dir()

        http = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60)
        api = Api(http, key)
        assert http.get("/readyz").json()["checks"] == {"database": "ok", "broker": "ok"}
        dataset = api.upload_ok(iris_csv(), "iris.csv", "tabular_classification", label_column="species")
        job = api.create_job(
            {"base_model": "mlp", "training_dataset": dataset["id"], "hyperparameters": {"epochs": 5}}
        ).json()
        job = api.wait_job(job["id"], timeout=120)
        assert job["status"] == "succeeded", f"{job['error']}\n{log_tail(log)}"
        long_job = api.create_job(
            {
                "base_model": "mlp",
                "training_dataset": dataset["id"],
                "hyperparameters": {"epochs": 1000, "batch_size": 1},
            }
        ).json()
        wait_for(
            lambda: api.get(f"/v1/jobs/{long_job['id']}").json()["status"] == "running",
            60,
            message="the long job",
        )
        http.close()
    finally:
        # Ctrl-C asks the running job to save its state and go back to the queue; a second Ctrl-C stops at
        # once, interrupting whatever is left.
        launcher.send_signal(signal.SIGINT)
        wait_for(lambda: "Stopping Graft" in log.read_text(), 10, message="the first Ctrl-C")
        code = interrupt(launcher, log)
    assert code == 0, log_tail(log)

    relaunched = start(home, port, log)
    try:
        output = wait_banner(relaunched, log, 2)
        assert output.count(key) >= 2, "the second start shows the same admin key"
        http = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60)
        api = Api(http, key)
        assert [d["id"] for d in api.get("/v1/datasets").json()["data"]] == [dataset["id"]]
        # The interrupted job went back to the queue (saved by the worker, or requeued by this start) and runs
        # again.
        events = [e["message"] for e in api.get(f"/v1/jobs/{long_job['id']}/events?limit=100").json()["data"]]
        assert any("queued again" in message for message in events), events
        wait_for(
            lambda: api.get(f"/v1/jobs/{long_job['id']}").json()["status"] == "running",
            60,
            message="the rerun",
        )
        # A worker killed with -9 (as by the out-of-memory killer), even moments after it started, is started
        # again by the launcher, and its job runs again.
        attempts = api.get(f"/v1/jobs/{long_job['id']}").json()["attempts"]
        worker_pid = int(
            subprocess.run(
                ["pgrep", "-P", str(relaunched.pid), "-f", "celery"],
                capture_output=True,
                text=True,
                check=True,
            ).stdout.split()[0]
        )
        os.killpg(worker_pid, signal.SIGKILL)
        wait_for(lambda: "starting it again" in log.read_text(), 30, message="the worker's restart")
        wait_for(
            lambda: (lambda j: j["status"] == "running" and j["attempts"] > attempts)(
                api.get(f"/v1/jobs/{long_job['id']}").json()
            ),
            90,
            message="the job on the restarted worker",
        )
        assert relaunched.poll() is None, log_tail(log)
        assert api.post(f"/v1/jobs/{long_job['id']}/cancel").status_code == 200
        assert api.wait_job(long_job["id"], timeout=30)["status"] == "cancelled"
        prediction = api.post(
            f"/v1/models/{job['result_model']}/predict",
            json={
                "inputs": [{"sepal_length": 5.0, "sepal_width": 3.4, "petal_length": 1.5, "petal_width": 0.2}]
            },
        )
        assert prediction.status_code == 200, prediction.text
        http.close()
    finally:
        assert interrupt(relaunched, log) == 0, log_tail(log)
