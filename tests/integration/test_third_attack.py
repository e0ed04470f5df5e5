"""The third outside test's reproductions, each at its cause: thin images, non-finite numbers, the report
picture, a 500 on a keep-alive connection, jobs accepted only to fail, a checkpoint's upstream, frozen
random layers, missing files, and the smaller findings (repeated cancels, arm ids, ignored columns)."""

from __future__ import annotations

import http.client
import json
import math
import threading
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch
from fastapi import FastAPI
from fastapi.testclient import TestClient
from PIL import Image
from safetensors.torch import save

from app.main import create_app
from graft import job_store
from graft.config import Settings
from graft.db import make_engine, make_session_factory, session_scope
from graft.spec import ModelSpec
from graft.storage import Storage
from ml.networks import build_model
from tests.conftest import ADMIN_KEY
from tests.helpers import (
    Api,
    digits_zip,
    free_port,
    image_zip,
    iris_csv,
    new_project,
    png_bytes,
    sentiment_rows,
    text_csv,
    unlabelled_csv,
)
from tests.integration.conftest import run_in_process, succeeded

TABULAR = "tabular_classification"
IRIS_ROW = {"sepal_length": 6.7, "sepal_width": 3.0, "petal_length": 5.2, "petal_width": 2.3}


def import_weights(api: Api, tensors: dict[str, torch.Tensor], config: dict[str, Any]) -> Any:
    return api.post(
        "/v1/models",
        files={"weights": ("model.safetensors", save({k: v.contiguous() for k, v in tensors.items()}))},
        data={"config": json.dumps(config)},
    )


def cnn_model(api: Api, classes: list[str]) -> str:
    spec = ModelSpec.for_builtin("cnn-small").with_classes(classes)
    response = import_weights(
        api,
        build_model(spec, pretrained=False).state_dict(),
        {"architecture": "cnn-small", "classes": classes},
    )
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


def thin(width: int, height: int) -> bytes:
    return png_bytes(Image.fromarray(np.full((height, width), 200, np.uint8), mode="L"))


# ------------------------------------------------------------------------------------ 1. thin images


def test_a_thin_image_is_prepared_at_the_cost_of_its_output(monkeypatch: pytest.MonkeyPatch) -> None:
    """A 1 x 60,000 strip read at 64 px: no intermediate image larger than the output is ever made (it was
    64 x 3,840,000, a gigabyte, before)."""
    from ml.preprocess import prepare_image

    asked: list[tuple[int, int]] = []
    resize = Image.Image.resize

    def recording(self: Image.Image, size: Any, *args: Any, **kwargs: Any) -> Image.Image:
        asked.append(tuple(size))
        return resize(self, size, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "resize", recording)
    spec = {"height": 64, "width": 64, "channels": 3}
    for width, height in ((1, 60_000), (60_000, 1), (3, 20_000)):
        array = prepare_image(thin(width, height), spec)
        assert array.shape == (3, 64, 64)
    assert asked and all(w * h <= 64 * 64 for w, h in asked), asked


def test_cropping_first_prepares_the_same_pixels_as_resizing_first() -> None:
    """The crop box reproduces "shorter side resized, then centre crop" (up to rounding of PIL's filter
    weights), for images of every shape and the sizes the built-ins read."""
    from ml.preprocess import normalise_mode, prepare_image

    def resized_then_cropped(image: Image.Image, side: int) -> np.ndarray:
        image = normalise_mode(image, 3)
        scale = max(side / image.width, side / image.height)
        size = (max(side, round(image.width * scale)), max(side, round(image.height * scale)))
        image = image.resize(size, Image.Resampling.BILINEAR)
        left, top = (image.width - side) // 2, (image.height - side) // 2
        return np.asarray(image.crop((left, top, left + side, top + side))).transpose(2, 0, 1)

    rng = np.random.default_rng(0)
    for _ in range(60):
        w, h = (int(v) for v in rng.integers(1, 300, 2))
        image = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        for side in (16, 64, 224):
            ours = prepare_image(image, {"height": side, "width": side, "channels": 3}).astype(int)
            assert np.abs(ours - resized_then_cropped(image, side).astype(int)).max() <= 1


def test_thin_images_are_predicted_and_trained_on(api: Api, settings: Settings) -> None:
    model = cnn_model(api, ["a", "b"])
    response = api.post(
        f"/v1/models/{model}/predict", files=[("files", ("s.png", thin(1, 60_000), "image/png"))]
    )
    assert response.status_code == 200, response.text
    # A training set of thin strips (one of 1 x 200,000) pretrains like any other.
    strips = [("a", Image.fromarray(np.full((40_000, 1), 10 * i, np.uint8), mode="L")) for i in range(4)]
    strips += [("b", Image.fromarray(np.full((1, 40_000), 10 * i, np.uint8), mode="L")) for i in range(3)]
    strips.append(("b", Image.fromarray(np.zeros((1, 200_000), np.uint8), mode="L")))
    dataset = api.upload_ok(image_zip(strips), "strips.zip", "image_classification")
    job = succeeded(
        api,
        settings,
        {
            "type": "pretrain",
            "base_model": "resnet-small",
            "training_dataset": dataset["id"],
            "hyperparameters": {"epochs": 1},
        },
    )
    assert job["result_model"]


# ----------------------------------------------------------------------------------- 2. report picture


@pytest.fixture(scope="module")
def reported(client: TestClient, settings: Settings) -> tuple[Api, str]:
    """A finetune job with a baseline (two runs of an mlp on iris), succeeded: (api, job id)."""
    api = new_project(Api(client, ADMIN_KEY))
    iris = api.upload_ok(iris_csv(), "iris.csv", TABULAR, label_column="species")
    parent = succeeded(
        api, settings, {"base_model": "mlp", "training_dataset": iris["id"], "hyperparameters": {"epochs": 3}}
    )
    job = succeeded(
        api,
        settings,
        {
            "base_model": parent["result_model"],
            "training_dataset": iris["id"],
            "baseline": True,
            "hyperparameters": {"epochs": 3, "cross_validation_folds": 0},
        },
    )
    return api, str(job["id"])


def test_the_report_picture_is_drawn_once_and_kept(
    reported: tuple[Api, str], settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    import graft.report

    api, job_id = reported
    drawn = []
    render = graft.report.render_png

    def counting(*args: Any, **kwargs: Any) -> bytes:
        drawn.append(1)
        return render(*args, **kwargs)

    monkeypatch.setattr(graft.report, "render_png", counting)
    first = api.get(f"/v1/jobs/{job_id}/report?format=png")
    second = api.get(f"/v1/jobs/{job_id}/report?format=png")
    assert first.status_code == second.status_code == 200
    assert first.content == second.content and first.content.startswith(b"\x89PNG")
    assert len(drawn) <= 1  # the second read the kept picture (the first may have found it kept already)
    kept = Storage(settings.storage_dir).path(f"reports/{job_id}.png")
    assert kept.read_bytes() == first.content


def test_the_per_class_panel_draws_the_classes_where_the_arms_differ_most() -> None:
    from graft.report import MAX_DRAWN_CLASSES, drawn_classes, render_png

    per_class = {f"c{i:04d}": {"transferred": 0.5, "scratch": 0.5} for i in range(1000)}
    per_class["c0500"] = {"transferred": 1.0, "scratch": 0.0}
    per_class["c0007"] = {"transferred": 0.0, "scratch": 0.9}
    chosen = drawn_classes(per_class)
    assert len(chosen) == MAX_DRAWN_CLASSES and {"c0500", "c0007"} <= set(chosen)
    assert chosen == sorted(chosen)  # in the report's order
    curve = [{"epoch": 1, "val_accuracy": 0.5, "val_loss": 1.0, "train_loss": 1.0}]
    report = {
        "kind": "transfer",
        "learning_curves": {"transferred": [curve], "scratch": [curve]},
        "per_class": per_class,
        "gain": {"val_accuracy": {"mean": 0.0}},
        "spread": 0.01,
        "negative_transfer": False,
    }
    assert render_png(report).startswith(b"\x89PNG")


class GoneRequest:
    """A request whose client has left."""

    async def is_disconnected(self) -> bool:
        return True


def test_a_drawing_stops_when_its_client_leaves_and_never_takes_a_compute_thread(
    reported: tuple[Api, str], client: TestClient, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    import graft.report
    from app.core.errors import ClientGone
    from app.core.security import Principal
    from app.jobs.router import _report_picture

    _api, job_id = reported
    context = client.app.state.context  # type: ignore[attr-defined]
    kept = Storage(settings.storage_dir).path(f"reports/{job_id}.png")
    kept.unlink(missing_ok=True)
    seen: dict[str, int] = {}

    def drawing(report: dict[str, Any], on_batch: Any = None) -> bytes:
        seen["compute"] = context.compute_limiter.borrowed_tokens
        seen["draw"] = context.draw_limiter.borrowed_tokens
        for _ in range(200):  # the parts of a long drawing; it stops at the next part once its client left
            on_batch()
            time.sleep(0.05)
        raise AssertionError("the drawing went on after its client left")

    monkeypatch.setattr(graft.report, "render_png", drawing)
    engine = make_engine(settings.effective_database_url)
    try:
        with session_scope(make_session_factory(engine)) as session:
            job = job_store.get_any(session, job_id)
            assert job is not None
            principal = Principal(project_id=job.project_id, key_id="test", role="admin")
    finally:
        engine.dispose()

    async def draw() -> None:
        await _report_picture(context, GoneRequest(), principal, job_id)  # type: ignore[arg-type]

    with pytest.raises(ClientGone):
        client.portal.call(draw)  # type: ignore[attr-defined]
    assert seen == {"compute": 0, "draw": 1}
    assert not kept.exists()


# ------------------------------------------------------------------------------------ 3. non-finite numbers


@pytest.mark.parametrize(
    ("value", "dtype", "problem"),
    [
        (math.nan, torch.float32, "NaN or infinite"),
        (math.inf, torch.float32, "NaN or infinite"),
        (1e300, torch.float64, "beyond the range"),
    ],
)
def test_weights_that_are_not_finite_are_refused_naming_the_tensor(
    api: Api, value: float, dtype: torch.dtype, problem: str
) -> None:
    spec = ModelSpec.for_builtin("cnn-small").with_classes(["a", "b"])
    tensors = {
        k: v.to(dtype) if v.is_floating_point() else v
        for k, v in build_model(spec, pretrained=False).state_dict().items()
    }
    tensors["head.weight"][0, 0] = value
    response = import_weights(api, tensors, {"architecture": "cnn-small", "classes": ["a", "b"]})
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert (
        error["code"] == "non_finite_weights"
        and "'head.weight'" in error["message"]
        and problem in error["message"]
    )
    assert [m for m in api.get("/v1/models").json()["data"] if not m["builtin"]] == []


def test_table_values_far_out_of_range_are_refused_at_upload_and_predict(
    api: Api, iris_model: tuple[Api, str, str]
) -> None:
    rows = iris_csv(20).decode().strip().split("\n")
    rows[3] = "3e38," + rows[3].split(",", 1)[1]
    response = api.upload("\n".join(rows).encode() + b"\n", "huge.csv", TABULAR, label_column="species")
    assert response.status_code == 422
    assert "row 3 (line 4), column 'sepal_length'" in response.json()["error"]["message"]
    owner, _dataset, model = iris_model
    response = owner.post(
        f"/v1/models/{model}/predict", json={"inputs": [{**IRIS_ROW, "sepal_length": 3e38}]}
    )
    assert response.status_code == 422 and "sepal_length" in response.json()["error"]["message"]


def test_a_run_whose_loss_becomes_nan_fails_as_diverged_naming_where(
    api: Api, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    from workers.recipes.finetune import FinetuneRecipe

    iris = api.upload_ok(iris_csv(), "iris.csv", TABULAR, label_column="species")
    original = FinetuneRecipe.training_loss
    calls = {"n": 0}

    def diverging(
        self: FinetuneRecipe, logits: torch.Tensor, target: torch.Tensor, indices: list[int]
    ) -> torch.Tensor:
        calls["n"] += 1
        loss = original(self, logits, target, indices)
        return loss * math.nan if calls["n"] >= 3 else loss

    monkeypatch.setattr(FinetuneRecipe, "training_loss", diverging)
    job = api.create_job(
        {"base_model": "mlp", "training_dataset": iris["id"], "hyperparameters": {"epochs": 2}}
    ).json()
    run_in_process(settings, job["id"])
    job = api.get(f"/v1/jobs/{job['id']}").json()
    assert job["status"] == "failed" and job["result_model"] is None
    assert job["error"]["code"] == "training_diverged"
    assert "epoch 1, step 3" in job["error"]["message"] and "nan" in job["error"]["message"]


def test_json_columns_never_hold_a_non_finite_number(api: Api, settings: Settings) -> None:
    from graft.db import finite_json

    assert json.loads(finite_json({"loss": math.nan, "n": [1.0, math.inf, {"x": -math.inf}]})) == {
        "loss": None,
        "n": [1.0, None, {"x": None}],
    }
    iris = api.upload_ok(iris_csv(), "iris.csv", TABULAR, label_column="species")
    job = api.create_job({"base_model": "mlp", "training_dataset": iris["id"]}).json()
    engine = make_engine(settings.effective_database_url)
    try:
        with session_scope(make_session_factory(engine)) as session:
            job_store.record_metrics(
                session,
                job["id"],
                {"val_loss": math.nan, "val_accuracy": 0.5},
                "Epoch 1",
                {"val_loss": math.inf},
            )
    finally:
        engine.dispose()
    shown = api.get(f"/v1/jobs/{job['id']}").json()
    assert shown["metrics"] == {"val_loss": None, "val_accuracy": 0.5}
    events = api.get(f"/v1/jobs/{job['id']}/events?limit=100").json()["data"]
    assert any(e["data"] == {"val_loss": None} for e in events)


def test_a_failed_jobs_error_never_quotes_the_database() -> None:
    from sqlalchemy.exc import DataError

    from workers.runner import _error_for

    error = _error_for(
        DataError(
            "INSERT INTO jobs (metrics) VALUES (%(metrics)s)",
            {"metrics": "NaN"},
            Exception("invalid input syntax for type json"),
        )
    )
    assert (
        "INSERT" not in error["message"] and "jobs" not in error["message"] and "json" not in error["message"]
    )
    assert error["code"] == "internal_error"


def test_a_model_computing_nan_gets_a_422_from_predict_and_ranking(api: Api, settings: Settings) -> None:
    """A model whose weights turned non-finite in storage (a model registered before imports checked them):
    its outputs are refused with a clear error, never served as null probabilities or a 500."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    iris = api.upload_ok(iris_csv(), "iris.csv", TABULAR, label_column="species")
    model = succeeded(
        api, settings, {"base_model": "mlp", "training_dataset": iris["id"], "hyperparameters": {"epochs": 2}}
    )["result_model"]
    storage = Storage(settings.storage_dir)
    path = storage.path(f"models/{model}/model.safetensors")
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
    tensors = {
        k: v * math.nan if v.is_floating_point() and k.endswith("weight") else v for k, v in tensors.items()
    }
    save_file(tensors, str(path), metadata=metadata)
    response = api.post(f"/v1/models/{model}/predict", json={"inputs": [IRIS_ROW]})
    assert response.status_code == 422 and response.json()["error"]["code"] == "non_finite_output", (
        response.text
    )
    response = api.post("/v1/transferability", json={"dataset": iris["id"], "models": [model]})
    assert response.status_code == 422 and response.json()["error"]["code"] == "non_finite_output", (
        response.text
    )


# ------------------------------------------------------------------------- 4. a 500 on a keep-alive connection


@pytest.fixture
def served(settings: Settings) -> Iterator[int]:
    """The application under a real uvicorn, with one route that fails unexpectedly: its port."""
    import uvicorn

    app: FastAPI = create_app(settings.model_copy(update={"reaper_interval_seconds": 0}))

    @app.get("/v1/broken")
    async def broken() -> None:
        raise RuntimeError("an error nobody handles")

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="critical"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    yield port
    server.should_exit = True
    thread.join(timeout=10)


def test_a_500_leaves_the_keep_alive_connection_usable(served: int) -> None:
    connection = http.client.HTTPConnection("127.0.0.1", served, timeout=10)
    headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
    for _ in range(2):
        connection.request("GET", "/v1/broken", headers=headers)
        failed = connection.getresponse()
        body = json.loads(failed.read())
        assert failed.status == 500 and body["error"]["code"] == "internal_error"
        assert "nobody handles" not in json.dumps(body)
        connection.request("GET", "/v1/models", headers=headers)  # the same connection
        answer = connection.getresponse()
        assert answer.status == 200 and json.loads(answer.read())["object"] == "list"
    connection.close()


# ---------------------------------------------------------------------- 5. jobs accepted only to fail


def test_more_folds_than_the_smallest_class_is_refused(api: Api) -> None:
    tiny = api.upload_ok(text_csv(sentiment_rows(4)), "tiny.csv", "text_classification")
    response = api.create_job(
        {
            "base_model": "minilm-l6",
            "training_dataset": tiny["id"],
            "method": "linear_probe",
            "baseline": True,
            "hyperparameters": {"cross_validation_folds": 10},
        }
    )
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert (
        error["param"] == "hyperparameters.cross_validation_folds" and "at most 2 folds" in error["message"]
    )
    assert api.get("/v1/jobs").json()["data"] == []


def test_a_baseline_on_a_split_that_holds_no_example_is_refused(api: Api) -> None:
    # Three examples per class: a 0.1 split holds none of them (a class lends one only from four on).
    small = api.upload_ok(text_csv(sentiment_rows(6)), "small.csv", "text_classification")
    response = api.create_job(
        {
            "base_model": "minilm-l6",
            "training_dataset": small["id"],
            "method": "linear_probe",
            "baseline": True,
            "hyperparameters": {"cross_validation_folds": 0, "validation_split": 0.1},
        }
    )
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["param"] == "baseline" and "holds no example" in error["message"]


# ------------------------------------------------------------------ 6. a distill job's checkpoint upstream


def test_a_finetune_from_a_distilled_students_checkpoint_trains_the_student(
    iris_model: tuple[Api, str, str], settings: Settings
) -> None:
    api, dataset, teacher = iris_model
    distilled = succeeded(
        api,
        settings,
        {
            "type": "distill",
            "teacher": teacher,
            "student": {"architecture": "mlp", "hidden": [16]},
            "training_dataset": dataset,
            "hyperparameters": {"epochs": 3},
        },
    )
    checkpoint = api.get(f"/v1/jobs/{distilled['id']}/checkpoints").json()["data"][-1]["id"]
    job = succeeded(
        api,
        settings,
        {"from_checkpoint": checkpoint, "training_dataset": dataset, "hyperparameters": {"epochs": 2}},
    )
    assert job["base_model"] == "mlp"  # the student's network, not the teacher
    model = api.get(f"/v1/models/{job['result_model']}").json()
    assert model["config"]["options"]["hidden"] == [16]


# --------------------------------------------------------------------- 7. frozen random layers


@pytest.mark.parametrize("backbone", ["partial", "frozen"])
def test_adapt_and_distill_refuse_frozen_random_layers(
    iris_model: tuple[Api, str, str], backbone: str
) -> None:
    api, dataset, teacher = iris_model
    target = api.upload_ok(unlabelled_csv(iris_csv(40, seed=1)), "t.csv", TABULAR)
    for body in (
        {
            "type": "adapt",
            "base_model": "mlp",
            "source_dataset": dataset,
            "target_dataset": target["id"],
            "backbone": backbone,
        },
        {
            "type": "distill",
            "teacher": teacher,
            "student": {"architecture": "mlp"},
            "training_dataset": dataset,
            "backbone": backbone,
        },
    ):
        response = api.post("/v1/jobs", json=body)
        assert response.status_code == 422, response.text
        error = response.json()["error"]
        assert error["param"] == "backbone" and "random" in error["message"]


# ------------------------------------------------------------------------------- 8. a missing model file


def test_a_missing_model_file_is_a_clear_409_everywhere(api: Api, settings: Settings) -> None:
    iris = api.upload_ok(iris_csv(), "iris.csv", TABULAR, label_column="species")
    model = succeeded(
        api, settings, {"base_model": "mlp", "training_dataset": iris["id"], "hyperparameters": {"epochs": 2}}
    )["result_model"]
    Storage(settings.storage_dir).path(f"models/{model}/model.safetensors").unlink()
    answers = [
        api.post(f"/v1/models/{model}/predict", json={"inputs": [IRIS_ROW]}),
        api.post(f"/v1/models/{model}/evaluate", json={"dataset": iris["id"]}),
        api.post("/v1/transferability", json={"dataset": iris["id"], "models": [model]}),
        api.get(f"/v1/models/{model}/content"),
    ]
    for response in answers:
        assert response.status_code == 409, response.text
        error = response.json()["error"]
        assert error["code"] == "missing_input" and f"model {model}" in error["message"]
        assert "safetensors" not in error["message"]  # the key is for the operator's log


# ---------------------------------------------------------------------------------------------- smaller


def test_repeated_cancels_of_a_running_job_write_one_event(api: Api, settings: Settings) -> None:
    iris = api.upload_ok(iris_csv(), "iris.csv", TABULAR, label_column="species")
    job = api.create_job({"base_model": "mlp", "training_dataset": iris["id"]}).json()
    engine = make_engine(settings.effective_database_url)
    try:
        with session_scope(make_session_factory(engine)) as session:
            assert job_store.claim(session, job["id"], "test-worker") is not None
    finally:
        engine.dispose()
    for _ in range(5):
        response = api.post(f"/v1/jobs/{job['id']}/cancel")
        assert response.status_code == 200 and response.json()["cancel_requested"] is True
    events = [e["message"] for e in api.get(f"/v1/jobs/{job['id']}/events?limit=100").json()["data"]]
    assert sum("Cancellation requested" in message for message in events) == 1


def test_a_baseline_arm_id_is_bounded(iris_model: tuple[Api, str, str]) -> None:
    api, dataset, model = iris_model
    response = api.create_job(
        {"base_model": model, "training_dataset": dataset, "baseline": ["scratch", "m" * 10_000]}
    )
    assert response.status_code == 422 and len(response.text) < 500
    error = response.json()["error"]
    assert error["param"] == "baseline.1" and "at most 64 characters" in error["message"]


def test_a_table_prediction_says_which_columns_it_did_not_read(iris_model: tuple[Api, str, str]) -> None:
    api, _dataset, model = iris_model
    response = api.post(
        f"/v1/models/{model}/predict", json={"inputs": [{**IRIS_ROW, "species": "virginica", "id": 7}]}
    )
    assert response.status_code == 200, response.text
    assert response.json()["ignored_columns"] == ["id", "species"]
    plain = api.post(f"/v1/models/{model}/predict", json={"inputs": [IRIS_ROW]}).json()
    assert plain["ignored_columns"] == []


def test_a_worker_pool_process_is_replaced_once_its_memory_passes_the_limit(settings: Settings) -> None:
    from graft.queueing import make_celery

    assert make_celery(settings).conf.worker_max_memory_per_child == settings.worker_max_memory_mb * 1024 > 0
    off = make_celery(settings.model_copy(update={"worker_max_memory_mb": 0}))
    assert off.conf.worker_max_memory_per_child is None


def test_an_image_dataset_and_its_job_say_what_size_the_images_are_read_at(api: Api) -> None:
    """resnet-small reads a dataset's images at their median shorter side: said with the dataset, and in
    the job's first event, with a warning when the sizes are far apart."""
    mixed = [("a", Image.new("L", (16, 16), 30)) for _ in range(5)] + [
        ("b", Image.new("L", (1024, 1024), 200)) for _ in range(4)
    ]
    dataset = api.upload_ok(image_zip(mixed), "mixed.zip", "image_classification")
    sizes = dataset["profile"]["image_sizes"]
    assert sizes["shorter_side"] == {"min": 16, "median": 16.0, "max": 1024} and sizes["read_at"] == 16
    assert "16 to 1024 px" in sizes["warning"]
    job = api.create_job({"base_model": "resnet-small", "training_dataset": dataset["id"]}).json()
    created = api.get(f"/v1/jobs/{job['id']}/events").json()["data"][0]["message"]
    assert "reads the images at 16 px" in created and "16 to 1024 px" in created
    assert job["plan"]["arms"][0]["network"]["side"] == 16
    uniform = api.upload_ok(digits_zip(12), "digits.zip", "image_classification")["profile"]["image_sizes"]
    assert "warning" not in uniform and uniform["read_at"] == 32
