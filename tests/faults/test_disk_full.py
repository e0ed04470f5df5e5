"""A storage volume that fills up: a real tmpfs of a few megabytes mounted as Graft's home (mounting needs
root, which the CI machine has). The database lives elsewhere, as it does in production."""

from __future__ import annotations

import contextlib
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from app.cli import prestart
from app.main import create_app
from graft.config import Settings
from graft.db import make_engine, make_session_factory, session_scope
from graft.storage import Storage, sha256_file
from graft.tables import Checkpoint, Job
from ml.resume import load_state
from tests.conftest import ADMIN_KEY
from tests.helpers import Api, digits_table_csv, new_project, wait_for
from tests.integration.conftest import run_in_process


@pytest.fixture
def volume(tmp_path: Path) -> Iterator[Path]:
    mount = tmp_path / "volume"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)], capture_output=True, text=True
    )
    assert done.returncode == 0, f"the disk-full tests mount a small tmpfs, which needs root: {done.stderr}"
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.fixture
def settings(volume: Path, tmp_path: Path) -> Settings:
    settings = Settings(
        home=volume,
        database_url=f"sqlite:///{tmp_path / 'graft.db'}",
        bootstrap_api_key=ADMIN_KEY,  # type: ignore[arg-type]
        worker_queue="disk-full",
        reaper_interval_seconds=0,
        cancel_poll_seconds=0.05,
    )
    prestart(settings)
    return settings


def fill(volume: Path) -> None:
    """Write until the volume has no space left."""
    with (volume / "filler").open("wb") as handle, contextlib.suppress(OSError):
        while True:
            handle.write(b"\0" * 65536)
            handle.flush()


def leftovers(storage: Storage) -> list[Path]:
    return [p for p in storage.tmp_dir.iterdir()]


def test_an_upload_that_fills_the_disk_gets_507_and_leaves_nothing(settings: Settings) -> None:
    storage = Storage(settings.storage_dir)
    with TestClient(create_app(settings)) as client:
        api = new_project(Api(client, ADMIN_KEY))
        big = b"x,label\n" + b"".join(b"%d,a\n" % i for i in range(600_000))  # ~5 MB, more than the volume
        response = api.upload(big, "big.csv", "tabular_classification", label_column="label")
        assert response.status_code == 507, response.text
        error = response.json()["error"]
        assert error["code"] == "storage_full" and error["param"] == "file"
        assert "nothing was stored" in error["message"]
        assert leftovers(storage) == []
        assert api.get("/v1/datasets").json()["data"] == []
        # The service is still up, and the space the failed upload took is free again.
        small = api.upload(
            digits_table_csv(range(2), 40), "small.csv", "tabular_classification", label_column="digit"
        )
        assert small.status_code == 201, small.text


def test_a_checkpoint_that_fills_the_disk_fails_the_job_clearly_and_keeps_the_last_one(
    settings: Settings, volume: Path
) -> None:
    storage = Storage(settings.storage_dir)
    with TestClient(create_app(settings)) as client:
        api = new_project(Api(client, ADMIN_KEY))
        dataset = api.upload_ok(
            digits_table_csv(range(10), 400), "d.csv", "tabular_classification", label_column="digit"
        )
        body = {
            "base_model": "mlp",
            "training_dataset": dataset["id"],
            "hyperparameters": {"epochs": 40, "batch_size": 1, "early_stopping": None},
        }
        job_id = api.create_job(body).json()["id"]
        thread = threading.Thread(target=run_in_process, args=(settings, job_id), daemon=True)
        thread.start()
        # Two checkpoints written (or the job's own checkpoints filled the volume first, which is the same
        # fault): then the disk fills up under the training.
        wait_for(
            lambda: (
                len(api.get(f"/v1/jobs/{job_id}/checkpoints").json()["data"]) >= 2
                or api.get(f"/v1/jobs/{job_id}").json()["status"] in ("failed", "succeeded")
            ),
            60,
            interval=0.05,
        )
        fill(volume)
        thread.join(120)
        job = api.get(f"/v1/jobs/{job_id}").json()
        assert job["status"] == "failed", job
        assert job["error"]["code"] == "storage_full"
        assert "intact" in job["error"]["message"]

    # Every checkpoint the job has is whole; nothing half-written is left in storage.
    assert leftovers(storage) == []
    engine = make_engine(settings.effective_database_url)
    with session_scope(make_session_factory(engine)) as session:
        rows = list(session.scalars(select(Checkpoint).where(Checkpoint.job_id == job_id)))
        resume = session.scalar(select(Job.resume_state).where(Job.id == job_id))
    engine.dispose()
    assert len(rows) >= 2
    for row in rows:
        assert sha256_file(storage.path(row.path)) == row.sha256
    on_disk = {
        str(p.relative_to(storage.root))
        for p in (storage.root / "checkpoints" / job_id).rglob("*")
        if p.is_file()
    }
    referenced = {row.path for row in rows} | {entry["path"] for entry in (resume or {}).values()}
    assert on_disk == referenced
    for entry in (resume or {}).values():
        assert load_state(storage.path(entry["path"])).epoch == entry["epoch"]
