"""Many clients at once against ONE uvicorn worker (as docker-compose and `make run` run the API): no request
waits on another's lock, thread or connection, and none gets a 500.

- 200 status reads at once, on the session's backend (PostgreSQL in CI): every one answered.
- On the embedded default (SQLite), always: resumable-upload chunks, predictions and reads at once, with
  /healthz probed throughout. Before the request path was reworked, every request held SQLite's write lock
  from its key check to its end and the upload handler made blocking database calls on the event loop:
  two of four parallel chunks failed after 30 s ("database is locked") and /healthz took 30 s.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from app.cli import api_command, prestart
from graft.config import Settings
from tests.conftest import ADMIN_KEY, Backend, make_settings
from tests.e2e.conftest import settings_env
from tests.helpers import free_port, iris_csv, log_tail, png_bytes, stop, wait_for

pytestmark = pytest.mark.e2e

# Polls a URL every 50 ms until a line arrives on stdin, then prints the latencies (seconds) as JSON.
PROBE = """
import json, sys, threading, time, urllib.request
url, latencies, stop = sys.argv[1], [], threading.Event()
threading.Thread(target=lambda: (sys.stdin.readline(), stop.set()), daemon=True).start()
while not stop.is_set():
    started = time.perf_counter()
    with urllib.request.urlopen(url, timeout=60) as response:
        assert response.status == 200
    latencies.append(time.perf_counter() - started)
    time.sleep(0.05)
print(json.dumps(latencies))
"""


@contextmanager
def api_server(settings: Settings, **env: str) -> Iterator[str]:
    """One uvicorn worker (no Celery worker: jobs stay queued), its base URL."""
    prestart(settings)
    log = settings.home / "api.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            api_command(settings), env={**settings_env(settings), **env}, stdout=out, stderr=subprocess.STDOUT
        )
    base = f"http://127.0.0.1:{settings.port}"
    try:

        def up() -> bool:
            assert process.poll() is None, log_tail(log)
            try:
                return httpx.get(f"{base}/healthz", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(up, 90, message="the API to answer")
        yield base
    finally:
        stop(process)
        text = log.read_text(errors="replace")
        assert "Traceback" not in text, log_tail(log, 120)


def _project(base: str) -> tuple[str, str]:
    """A fresh project and a member key of it."""
    with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=60) as http:
        project = http.post("/v1/projects", json={"name": "concurrency"})
        assert project.status_code == 201, project.text
        key = http.post(f"/v1/projects/{project.json()['id']}/api_keys", json={"name": "load"})
        assert key.status_code == 201, key.text
        return project.json()["id"], key.json()["key"]


def _queued_jobs(base: str, key: str, count: int) -> list[str]:
    with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {key}"}, timeout=60) as http:
        dataset = http.post(
            "/v1/datasets",
            files={"file": ("iris.csv", iris_csv())},
            data={"task": "tabular_classification", "label_column": "species"},
        )
        assert dataset.status_code == 201, dataset.text
        ids = []
        for _ in range(count):
            job = http.post(
                "/v1/jobs",
                json={"type": "finetune", "base_model": "mlp", "training_dataset": dataset.json()["id"]},
            )
            assert job.status_code == 201, job.text
            ids.append(job.json()["id"])
        return ids


def test_two_hundred_status_reads_at_once_are_all_answered(
    backend: Backend, tmp_path_factory: pytest.TempPathFactory
) -> None:
    home = tmp_path_factory.mktemp("reads-home")
    settings = make_settings(backend, home, port=free_port(), worker_queue=f"reads-{secrets.token_hex(4)}")
    with api_server(settings) as base:
        _, key = _project(base)
        ids = _queued_jobs(base, key, 20)

        async def storm() -> list[int]:
            limits = httpx.Limits(max_connections=250, max_keepalive_connections=250)
            async with httpx.AsyncClient(
                base_url=base, headers={"Authorization": f"Bearer {key}"}, limits=limits, timeout=60
            ) as http:

                async def read(i: int) -> int:
                    response = await http.get(f"/v1/jobs/{ids[i % len(ids)]}")
                    if response.status_code == 200:
                        assert response.json()["id"] == ids[i % len(ids)]
                    return response.status_code

                # Twice: the first wave also opens the connections.
                first = await asyncio.gather(*(read(i) for i in range(200)))
                second = await asyncio.gather(*(read(i) for i in range(200)))
                listing = await asyncio.gather(*(http.get("/v1/jobs?limit=20") for _ in range(50)))
                return [*first, *second, *(r.status_code for r in listing)]

        statuses = asyncio.run(asyncio.wait_for(storm(), timeout=120))
        assert statuses == [200] * 450, sorted(set(statuses))


def _image_files(count: int, size: int) -> list[tuple[str, tuple[str, bytes, str]]]:
    image = Image.linear_gradient("L").resize((size, size)).convert("RGB")
    data = png_bytes(image)
    return [("files", (f"img{i}.png", data, "image/png")) for i in range(count)]


def _cnn_small_weights(path: Path) -> Path:
    """Random cnn-small weights for two classes, as a safetensors file Graft imports."""
    from graft.spec import ModelSpec
    from ml.networks import build_model
    from ml.weights import save_weights

    spec = ModelSpec.for_builtin("cnn-small").with_classes(["a", "b"])
    save_weights(path, build_model(spec, pretrained=False).state_dict(), spec)
    return path


def test_uploads_predictions_and_reads_at_once_on_sqlite(tmp_path_factory: pytest.TempPathFactory) -> None:
    home = tmp_path_factory.mktemp("sqlite-home")
    embedded = Backend("embedded", None, None)
    settings = make_settings(embedded, home, port=free_port(), worker_queue=f"storm-{secrets.token_hex(4)}")
    with api_server(settings) as base:
        _, key = _project(base)
        auth = {"Authorization": f"Bearer {key}"}
        job_ids = _queued_jobs(base, key, 5)
        weights = _cnn_small_weights(home / "cnn.safetensors")
        with httpx.Client(base_url=base, headers=auth, timeout=60) as http:
            model = http.post(
                "/v1/models",
                files={"weights": ("cnn.safetensors", weights.read_bytes())},
                data={"config": json.dumps({"architecture": "cnn-small", "classes": ["a", "b"]})},
            )
            assert model.status_code == 201, model.text
        model_id = model.json()["id"]
        chunk = b"text,label\n" + b"hello,a\nbye,b\n" * 40_000  # ~600 KB per chunk

        async def storm() -> tuple[list[tuple[str, int]], list[float], list[str]]:
            limits = httpx.Limits(max_connections=100, max_keepalive_connections=100)
            async with httpx.AsyncClient(base_url=base, headers=auth, limits=limits, timeout=120) as http:
                uploads = []
                for _ in range(10):
                    created = await http.post("/v1/uploads", json={"filename": "r.csv", "size": len(chunk)})
                    assert created.status_code == 201, created.text
                    uploads.append(created.json()["id"])

                async def slow_body() -> Any:
                    # The chunk arrives over a second: a request that held a lock while reading its body
                    # would hold it that long.
                    step = len(chunk) // 10
                    for start in range(0, len(chunk), step):
                        yield chunk[start : start + step]
                        await asyncio.sleep(0.1)

                async def patch(upload_id: str) -> tuple[str, int]:
                    response = await http.patch(
                        f"/v1/uploads/{upload_id}",
                        content=slow_body(),
                        headers={"Content-Type": "application/offset+octet-stream", "Upload-Offset": "0"},
                    )
                    return "patch", response.status_code

                async def predict() -> tuple[str, int]:
                    response = await http.post(f"/v1/models/{model_id}/predict", files=_image_files(64, 384))
                    return "predict", response.status_code

                async def read(i: int) -> tuple[str, int]:
                    path = (
                        f"/v1/jobs/{job_ids[i % 5]}",
                        "/v1/jobs?limit=5",
                        "/v1/datasets",
                        "/v1/uploads/" + uploads[0],
                    )
                    response = await http.get(path[i % 4])
                    return "read", response.status_code

                # /healthz is timed from a process of its own: this test's event loop is busy encoding the
                # other requests, and its delays are not the server's.
                prober = subprocess.Popen(
                    [sys.executable, "-c", PROBE, f"{base}/healthz"],
                    stdout=subprocess.PIPE,
                    stdin=subprocess.PIPE,
                )
                await asyncio.sleep(1.0)
                work = (
                    [patch(u) for u in uploads] + [predict() for _ in range(3)] + [read(i) for i in range(60)]
                )
                results = await asyncio.gather(*work)
                out, _ = prober.communicate(b"stop\n", timeout=30)
                healthz = json.loads(out)
                return list(results), healthz, uploads

        results, healthz, uploads = asyncio.run(asyncio.wait_for(storm(), timeout=300))
        failures = [(kind, status) for kind, status in results if status != 200]
        assert not failures, failures
        # The old code froze /healthz for the whole storm (30 s). The bar: nine probes in ten under 100 ms and
        # none near a second; the odd single probe is the probe process descheduled on a loaded 2-core runner.
        assert len(healthz) >= 10
        ordered = sorted(healthz)
        p90 = ordered[int(0.9 * (len(ordered) - 1))]
        assert p90 < 0.1 and ordered[-1] < 1.0, (
            f"/healthz latencies (s) while the others were served: {ordered}"
        )
        with httpx.Client(base_url=base, headers=auth, timeout=60) as http:
            for upload_id in uploads:  # every chunk landed whole
                assert http.get(f"/v1/uploads/{upload_id}").json()["offset"] == len(chunk)


def test_a_long_computation_holds_up_no_prediction_and_stops_when_its_client_leaves(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """One compute thread (GRAFT_COMPUTE_CONCURRENCY=1): a ranking that takes seconds does not hold up a
    prediction (they have a lane of their own), and a ranking whose client went away stops, so the next one
    does not wait for it. Before, predictions queued behind rankings on the same two threads, and an
    abandoned ranking ran to its end (113 s in the outside attack)."""
    from tests.helpers import sentiment_rows, text_csv

    def long_rows(seed: int) -> list[tuple[str, str]]:  # texts of the full 128 tokens: seconds to rank
        return [(" ".join([text] * 25), label) for text, label in sentiment_rows(600, seed=seed)]

    home = tmp_path_factory.mktemp("lanes-home")
    embedded = Backend("embedded", None, None)
    settings = make_settings(embedded, home, port=free_port(), worker_queue=f"lanes-{secrets.token_hex(4)}")
    with api_server(settings, GRAFT_COMPUTE_CONCURRENCY="1") as base:
        _, key = _project(base)
        auth = {"Authorization": f"Bearer {key}"}
        with httpx.Client(base_url=base, headers=auth, timeout=300) as http:
            texts = [
                http.post(
                    "/v1/datasets",
                    files={"file": (f"t{seed}.csv", text_csv(long_rows(seed)))},
                    data={"task": "text_classification"},
                ).json()["id"]
                for seed in range(3)
            ]
            spec = {
                "architecture": "mlp",
                "classes": ["x", "y"],
                "feature_columns": ["a", "b"],
                "hidden": [8],
            }
            weights = home / "mlp.safetensors"
            _mlp_weights(weights)
            model = http.post(
                "/v1/models",
                files={"weights": ("m.safetensors", weights.read_bytes())},
                data={"config": json.dumps(spec)},
            )
            assert model.status_code == 201, model.text
        model_id = model.json()["id"]
        features = home / "storage" / "cache" / "features"

        async def run() -> None:
            async with httpx.AsyncClient(base_url=base, headers=auth, timeout=300) as http:

                def rank(dataset: str) -> Any:
                    return http.post(
                        "/v1/transferability", json={"dataset": dataset, "models": ["minilm-l6"]}
                    )

                # A prediction while a ranking holds the only compute thread.
                ranking = asyncio.create_task(rank(texts[0]))
                await asyncio.sleep(1.0)
                predicted = await http.post(
                    f"/v1/models/{model_id}/predict", json={"inputs": [{"a": 1.0, "b": 2.0}]}
                )
                assert predicted.status_code == 200, predicted.text
                assert not ranking.done(), "the ranking ended before the prediction: nothing was shown"
                assert (await ranking).status_code == 200
                cached = len(list(features.glob("*.safetensors")))
                # A ranking whose client leaves after a second, then another one.
                with pytest.raises(httpx.TimeoutException):
                    await http.post(
                        "/v1/transferability",
                        json={"dataset": texts[1], "models": ["minilm-l6"]},
                        timeout=1.0,
                    )
                assert (await rank(texts[2])).status_code == 200
                # The abandoned one stopped before its features were complete: only the last one was cached.
                assert len(list(features.glob("*.safetensors"))) == cached + 1

        asyncio.run(asyncio.wait_for(run(), timeout=300))


def _mlp_weights(path: Path) -> Path:
    from graft.spec import ModelSpec
    from ml.networks import build_model
    from ml.weights import save_weights

    spec = ModelSpec.for_builtin("mlp").with_classes(["x", "y"])
    spec = spec.model_copy(
        update={
            "options": {"in_features": 2, "hidden": [8]},
            "input_spec": {**spec.input_spec, "feature_columns": ["a", "b"]},
        }
    )
    save_weights(path, build_model(spec, pretrained=False).state_dict(), spec)
    return path
