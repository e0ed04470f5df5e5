"""Upstream to downstream over HTTP on a real worker: pretrain, fine-tune with a from-scratch baseline,
the report and its picture, evaluation, export and loading outside Graft, LoRA, partial, checkpoints."""

from __future__ import annotations

import io
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load

from graft.defaults import METHOD_DEFAULTS
from tests.e2e.conftest import Stack
from tests.helpers import Api, digit_images, digits_zip, iris_csv, png_bytes, sentiment_rows, text_csv

pytestmark = pytest.mark.e2e
README = Path(__file__).resolve().parents[2] / "README.md"


def finished(api: Api, stack: Stack, job_id: str, timeout: float = 300) -> dict[str, Any]:
    try:
        job = api.wait_job(job_id, timeout=timeout)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{stack.logs()}") from None
    assert job["status"] == "succeeded", f"{job['error']}\n{stack.logs()}"
    return job


def readme_loading_snippet() -> str:
    text = README.read_text()
    match = re.search(r"<!-- load-outside-graft -->\s*```python\n(.*?)```", text, re.S)
    assert match, "the README shows how to load a model outside Graft"
    return match.group(1)


def test_pretrain_finetune_report_evaluate_export(stack: Stack, tmp_path: Path) -> None:
    api = stack.project()
    source = api.upload_ok(
        digits_zip(300, classes=range(6), seed=1), "digits-0-5.zip", "image_classification"
    )
    target = api.upload_ok(
        digits_zip(48, classes=range(6, 10), seed=2), "digits-6-9.zip", "image_classification"
    )
    held_out = api.upload_ok(
        digits_zip(40, classes=range(6, 10), seed=2, offset=48), "held-out.zip", "image_classification"
    )
    small_held_out = api.upload_ok(
        digits_zip(20, classes=range(6, 10), seed=2, offset=88), "small.zip", "image_classification"
    )

    # Upstream: pretrain cnn-small from scratch on digits 0-5.
    pretrain = api.create_job(
        {
            "type": "pretrain",
            "base_model": "cnn-small",
            "training_dataset": source["id"],
            "hyperparameters": {"epochs": 6},
        }
    ).json()
    pretrain = finished(api, stack, pretrain["id"])
    upstream = api.get(f"/v1/models/{pretrain['result_model']}").json()
    assert upstream["kind"] == "pretrained"
    assert upstream["lineage"] == {
        "parent_model": "cnn-small",
        "source_dataset": source["id"],
        "job": pretrain["id"],
    }

    # Downstream: a new label set (task transfer), with the from-scratch baseline over two seeds.
    job = api.create_job(
        {
            "base_model": upstream["id"],
            "training_dataset": target["id"],
            "method": "full",
            "baseline": True,
            "seeds": [1, 2],
            "hyperparameters": {"epochs": 6, "validation_split": 0.25},
        }
    ).json()
    assert job["transfer"] == {"kind": "task", "head": "new"}
    job = finished(api, stack, job["id"])
    assert job["transfer"]["kind"] == "task" and job["transfer"]["source_classes"] == [
        "five",
        "four",
        "one",
        "three",
        "two",
        "zero",
    ]
    assert job["report_url"] == f"/v1/jobs/{job['id']}/report"
    events = [e["message"] for e in api.get(f"/v1/jobs/{job['id']}/events?limit=100").json()["data"]]
    assert any(m.startswith("[scratch, seed 2] Epoch 6") for m in events)

    report = api.get(job["report_url"]).json()
    assert report["object"] == "job.report" and report["job_id"] == job["id"] and report["seeds"] == [1, 2]
    for key in (
        "transferred",
        "scratch",
        "gain",
        "spread",
        "negative_transfer",
        "convergence",
        "per_class",
        "confusion_matrix",
        "learning_curves",
        "summary",
    ):
        assert key in report, key
    gains = [
        t - s
        for t, s in zip(
            report["transferred"]["val_accuracy"]["values"],
            report["scratch"]["val_accuracy"]["values"],
            strict=True,
        )
    ]
    assert report["gain"]["val_accuracy"]["values"] == pytest.approx(gains)
    assert set(report["per_class"]) == {"six", "seven", "eight", "nine"}
    # The baseline trains at the from-scratch rate; the job fine-tunes learned weights at a quarter of it.
    assert report["budget"]["scratch"] == {
        "architecture": "cnn-small",
        "method": "full",
        "learning_rate": METHOD_DEFAULTS[("cnn-small", "full")]["learning_rate"],
    }
    assert job["hyperparameters"]["learning_rate"] < report["budget"]["scratch"]["learning_rate"]
    picture = api.get(f"{job['report_url']}?format=png")
    assert picture.status_code == 200 and picture.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(picture.content)).size[0] > 1000

    # Checkpoints: one per epoch of the job's own run, the best one marked and kept as the model.
    checkpoints = api.get(f"/v1/jobs/{job['id']}/checkpoints").json()["data"]
    assert [c["epoch"] for c in checkpoints] == [1, 2, 3, 4, 5, 6]
    best = [c for c in checkpoints if c["best"]]
    assert [c["id"] for c in best] == [job["best_checkpoint"]]
    model_id = job["result_model"]
    assert api.get(f"/v1/models/{model_id}").json()["metrics"]["best_epoch"] == best[0]["epoch"]

    # Evaluation on held-out data: directly for a small set, as a job for a larger one.
    direct = api.post(f"/v1/models/{model_id}/evaluate", json={"dataset": small_held_out["id"]})
    assert direct.status_code == 200 and direct.json()["num_examples"] == 20
    queued = api.post(f"/v1/models/{model_id}/evaluate", json={"dataset": held_out["id"]})
    assert queued.status_code == 202
    evaluation = finished(api, stack, queued.json()["id"])["metrics"]
    assert evaluation["num_examples"] == 40 and set(evaluation) >= {
        "accuracy",
        "macro_f1",
        "per_class",
        "confusion_matrix",
    }

    # Export, and load it outside Graft exactly as the README shows.
    content = api.get(f"/v1/models/{model_id}/content").content
    (tmp_path / "model.safetensors").write_bytes(content)
    _, image = digit_images(1, classes=range(6, 10), seed=5)[0]
    (tmp_path / "digit.png").write_bytes(png_bytes(image))
    script = tmp_path / "load.py"
    script.write_text(readme_loading_snippet())
    outside = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert outside.returncode == 0, outside.stderr
    served = api.post(
        f"/v1/models/{model_id}/predict", files=[("files", ("digit.png", png_bytes(image), "image/png"))]
    ).json()
    assert outside.stdout.strip() == served["predictions"][0]["label"]


def test_lora_partial_cache_and_checkpoints(stack: Stack) -> None:
    api = stack.project()
    reviews = api.upload_ok(text_csv(sentiment_rows(40)), "reviews.csv", "text_classification")

    lora = api.create_job(
        {
            "base_model": "minilm-l6",
            "training_dataset": reviews["id"],
            "method": "lora",
            "hyperparameters": {"epochs": 2, "lora_rank": 4},
        }
    ).json()
    lora = finished(api, stack, lora["id"])
    model = api.get(f"/v1/models/{lora['result_model']}").json()
    assert model["adapter"] is True
    adapter = load(api.get(f"/v1/models/{model['id']}/adapter").content)
    assert any(".lora_A." in k for k in adapter) and "head.weight" in adapter
    merged = load(api.get(f"/v1/models/{model['id']}/content").content)
    assert not any("lora" in k for k in merged)
    prediction = api.post(f"/v1/models/{model['id']}/predict", json={"inputs": ["a wonderful film"]})
    assert prediction.status_code == 200 and prediction.json()["predictions"][0]["label"] in (
        "positive",
        "negative",
    )

    # The LoRA job fitted its new head on minilm-l6's frozen features first, computing them once; linear
    # probes on the same data reuse them from the feature cache.
    lora_events = [e["message"] for e in api.get(f"/v1/jobs/{lora['id']}/events?limit=100").json()["data"]]
    assert any(
        m.startswith(f"Computed backbone features for 40 examples of {reviews['id']}") for m in lora_events
    )
    assert any(m.startswith("Fitted the new head on frozen features for 10 epochs") for m in lora_events)
    probes = [
        finished(
            api,
            stack,
            api.create_job(
                {
                    "base_model": "minilm-l6",
                    "training_dataset": reviews["id"],
                    "method": "linear_probe",
                    "hyperparameters": {"epochs": 3},
                }
            ).json()["id"],
        )
        for _ in range(2)
    ]
    messages = [
        [e["message"] for e in api.get(f"/v1/jobs/{p['id']}/events?limit=100").json()["data"]] for p in probes
    ]
    for events in messages:
        assert any(
            m.startswith(f"Reused cached backbone features for 40 examples of {reviews['id']}")
            for m in events
        )

    # Start a new job from the probe's best checkpoint (a head on minilm-l6): the same label set keeps it.
    checkpoint = probes[0]["best_checkpoint"]
    resumed = api.create_job(
        {
            "from_checkpoint": checkpoint,
            "training_dataset": reviews["id"],
            "method": "partial",
            "hyperparameters": {"epochs": 1},
        }
    ).json()
    assert resumed["base_model"] == "minilm-l6" and resumed["from_checkpoint"] == checkpoint
    assert resumed["transfer"] == {"kind": "domain", "head": "keep"}
    resumed = finished(api, stack, resumed["id"])
    # It starts where the checkpoint left off: its first epoch is already as good as the probe's best.
    first_epoch = api.get(f"/v1/jobs/{resumed['id']}/checkpoints").json()["data"][0]
    assert first_epoch["metrics"]["val_accuracy"] >= 0.75
    path_checkpoint = api.get(f"/v1/checkpoints/{first_epoch['id']}/content").content
    tensors = load(path_checkpoint)
    assert any(k.startswith("backbone.encoder.encoder.layer.5.") for k in tensors)
    assert not any(k.startswith("backbone.encoder.encoder.layer.0.") for k in tensors)


def test_tabular_partial_with_early_stopping(stack: Stack, tmp_path: Path) -> None:
    api = stack.project()
    iris = api.upload_ok(iris_csv(), "iris.csv", "tabular_classification", label_column="species")
    upstream = finished(
        api,
        stack,
        api.create_job(
            {
                "type": "pretrain",
                "base_model": "mlp",
                "training_dataset": iris["id"],
                "hyperparameters": {"epochs": 20},
            }
        ).json()["id"],
    )
    job = api.create_job(
        {
            "base_model": upstream["result_model"],
            "training_dataset": iris["id"],
            "method": "partial",
            "hyperparameters": {
                "epochs": 100,
                "learning_rate": 0.05,
                "early_stopping": {"metric": "val_loss", "patience": 2},
            },
        }
    ).json()
    job = finished(api, stack, job["id"])
    assert job["progress"]["epoch"] < 100
    events = [e["message"] for e in api.get(f"/v1/jobs/{job['id']}/events?limit=100").json()["data"]]
    assert any(m.startswith("Early stopping after epoch") for m in events)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(api.get(f"/v1/models/{job['result_model']}/content").content)
    with safe_open(str(weights), framework="pt") as handle:
        assert '"architecture": "mlp"' in (handle.metadata() or {})["graft_spec"]
