"""Issue-4 flows over HTTP on a real worker: adapt a labelled source to an unlabelled target beside
source_only and read which helped; distil a fine-tuned model into a smaller one; rank upstream models."""

from __future__ import annotations

import pytest

from tests.e2e.conftest import Stack
from tests.e2e.test_transfer_end_to_end import finished
from tests.helpers import digits_table_csv, shifted_table_csv

pytestmark = pytest.mark.e2e
TABULAR = "tabular_classification"


def test_adapt_distill_and_rank_as_a_user_would(stack: Stack) -> None:
    api = stack.project()
    source = api.upload_ok(shifted_table_csv(300, domain="source"), "source.csv", TABULAR)
    target = api.upload_ok(shifted_table_csv(300, domain="target", with_labels=False), "target.csv", TABULAR)
    evaluation = api.upload_ok(shifted_table_csv(200, domain="target", seed=7), "target-eval.csv", TABULAR)
    assert target["labeled"] is False

    adapt = api.create_job(
        {
            "type": "adapt",
            "base_model": "mlp",
            "source_dataset": source["id"],
            "target_dataset": target["id"],
            "evaluation_dataset": evaluation["id"],
            "methods": ["dann", "coral"],
            "seed": 0,
        }
    )
    assert adapt.status_code == 201, adapt.text
    job = finished(api, stack, adapt.json()["id"])
    report = api.get(job["report_url"]).json()
    assert list(report["methods"]) == ["source_only", "dann", "coral"]
    assert "dann" in report["helped"], report["summary"]
    assert report["summary"].startswith("On the target, source_only reached")

    # Distil a fine-tuned model into a smaller one.
    digits = api.upload_ok(digits_table_csv(range(10), 800), "digits.csv", TABULAR, label_column="digit")
    transfer = api.upload_ok(
        digits_table_csv(range(10), 150, offset=800), "transfer.csv", TABULAR, label_column="digit"
    )
    held_out = api.upload_ok(
        digits_table_csv(range(10), 300, offset=1000), "held-out.csv", TABULAR, label_column="digit"
    )
    teacher = finished(
        api, stack, api.create_job({"base_model": "mlp", "training_dataset": digits["id"]}).json()["id"]
    )
    distill = api.create_job(
        {
            "type": "distill",
            "teacher": teacher["result_model"],
            "student": {"architecture": "mlp", "hidden": [32]},
            "training_dataset": transfer["id"],
            "evaluation_dataset": held_out["id"],
            "seed": 0,
        }
    )
    assert distill.status_code == 201, distill.text
    job = finished(api, stack, distill.json()["id"])
    report = api.get(job["report_url"]).json()
    assert report["kind"] == "distillation"
    assert report["distilled_student"]["accuracy"] > report["scratch_student"]["accuracy"], report["summary"]
    assert report["compression"]["parameters"] > 5

    # Rank three upstream models for a dataset before fine-tuning.
    ranked = api.post(
        "/v1/transferability",
        json={"dataset": held_out["id"], "models": ["mlp", teacher["result_model"], job["result_model"]]},
    )
    assert ranked.status_code == 200, ranked.text
    body = ranked.json()
    assert sorted(body["ranking"]) == sorted(["mlp", teacher["result_model"], job["result_model"]])
    assert body["ranking"][-1] == "mlp"  # random weights come last
