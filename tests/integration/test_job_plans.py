"""A job's runs are planned once (graft/plan.py): the API prices and bounds the plan and shows it with the
job; the worker makes exactly its runs, each with its arm's hyperparameters."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from graft.config import Settings
from graft.jobspec import AdaptHyperparameters, DistillHyperparameters, FinetuneHyperparameters
from graft.plan import JobPlan
from tests.conftest import ADMIN_KEY
from tests.helpers import (
    Api,
    iris_csv,
    new_project,
    sentiment_rows,
    shifted_table_csv,
    text_csv,
    unlabelled_csv,
)
from tests.integration.conftest import succeeded

TABULAR = "tabular_classification"
HYPERPARAMETERS = {
    "finetune": FinetuneHyperparameters,
    "pretrain": FinetuneHyperparameters,
    "adapt": AdaptHyperparameters,
    "distill": DistillHyperparameters,
}


def events(api: Api, job_id: str) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []
    after = None
    while True:
        page = api.get(
            f"/v1/jobs/{job_id}/events", params={"limit": 100, **({"after": after} if after else {})}
        )
        found += page.json()["data"]
        if not page.json()["has_more"]:
            return found
        after = found[-1]["id"]


def executed(api: Api, job_id: str) -> dict[str, dict[str, Any]]:
    """Per run the worker made: the hyperparameters it trained with, as each run reported them when it
    set up (its model loaded, its data read)."""
    found: dict[str, dict[str, Any]] = {}
    for event in events(api, job_id):
        data = event["data"] or {}
        if "hyperparameters" in data and "run" in data:
            assert data["run"] not in found, f"run {data['run']} set up twice"
            found[data["run"]] = data["hyperparameters"]
    return found


def assert_ran_as_planned(api: Api, job: dict[str, Any]) -> JobPlan:
    plan = JobPlan.model_validate(job["plan"])
    kind = HYPERPARAMETERS[job["type"]]
    planned = {
        run.name: kind.model_validate(run.hyperparameters).model_dump(mode="json") for run in plan.runs()
    }
    ran = executed(api, job["id"])
    assert sorted(ran) == sorted(planned)  # every planned run, once, and no other
    for name, hyperparameters in planned.items():
        assert ran[name] == hyperparameters, name
    assert plan.cost.seconds > 0 and plan.cost.optimizer_steps > 0
    return plan


@pytest.fixture(scope="module")
def project(client: TestClient) -> Api:
    return new_project(Api(client, ADMIN_KEY))


@pytest.fixture(scope="module")
def iris(project: Api) -> str:
    return str(project.upload_ok(iris_csv(), "iris.csv", TABULAR, label_column="species")["id"])


@pytest.fixture(scope="module")
def learned(project: Api, settings: Settings, iris: str) -> str:
    """An mlp trained on iris: learned weights to transfer from."""
    return str(
        succeeded(
            project,
            settings,
            {"base_model": "mlp", "training_dataset": iris, "hyperparameters": {"epochs": 3}},
        )["result_model"]
    )


def test_a_baseline_study_runs_its_plan(project: Api, settings: Settings, iris: str, learned: str) -> None:
    held = project.upload_ok(iris_csv(60, seed=3), "held.csv", TABULAR, label_column="species")["id"]
    job = succeeded(
        project,
        settings,
        {
            "base_model": learned,
            "training_dataset": iris,
            "evaluation_dataset": held,
            "baseline": ["scratch", "as_is"],
            "seeds": [1, 2],
            "hyperparameters": {"epochs": 2},
        },
    )
    plan = assert_ran_as_planned(project, job)
    assert [arm.name for arm in plan.arms] == ["transferred", "scratch", "as_is"]
    assert len(plan.runs()) == 4  # two seeds of the transferred and the scratch arm; as_is only predicts
    transferred, scratch = plan.arm("transferred"), plan.arm("scratch")
    # What a user could not see before: the scratch arm's own rate, and the head warm-up's.
    assert scratch.hyperparameters["learning_rate"] != transferred.hyperparameters["learning_rate"]
    assert transferred.hyperparameters["head_warmup_learning_rate"] == 1e-2
    assert "head_warmup_learning_rate" not in scratch.hyperparameters  # random weights warm nothing up
    # Validation and the evaluation set are priced: every epoch's validation, the held-out measure at the end.
    assert transferred.examples.evaluation == 60
    assert transferred.cost.forward_examples >= 2 * (2 * transferred.examples.validation + 60)


def test_a_cross_validated_study_runs_its_plan(
    project: Api, settings: Settings, iris: str, learned: str
) -> None:
    job = succeeded(
        project,
        settings,
        {
            "base_model": learned,
            "training_dataset": iris,
            "baseline": True,
            "hyperparameters": {"epochs": 2, "cross_validation_folds": 2},
        },
    )
    plan = assert_ran_as_planned(project, job)
    assert [run.name for run in plan.runs()] == [
        "transferred, all labels",
        *[f"{arm}, seed {job['seed']}, fold {k}" for k in (1, 2) for arm in ("transferred", "scratch")],
    ]
    folds = plan.arm("transferred").hyperparameters
    assert (
        folds["model_selection"] == "last"
        and plan.arm("transferred, all labels").hyperparameters["validation_split"] == 0
    )


def test_pretraining_and_self_supervision_run_their_plans(
    project: Api, settings: Settings, iris: str
) -> None:
    for body in (
        {"type": "pretrain", "base_model": "mlp", "training_dataset": iris, "hyperparameters": {"epochs": 2}},
        {
            "type": "pretrain",
            "base_model": "mlp",
            "method": "self_supervised",
            "training_dataset": iris,
            "hyperparameters": {"epochs": 2},
        },
    ):
        assert len(assert_ran_as_planned(project, succeeded(project, settings, body)).runs()) == 1


def test_semi_supervised_fine_tuning_runs_its_plan(
    project: Api, settings: Settings, iris: str, learned: str
) -> None:
    unlabelled = project.upload_ok(unlabelled_csv(iris_csv(90, seed=5)), "u.csv", TABULAR)["id"]
    job = succeeded(
        project,
        settings,
        {
            "base_model": learned,
            "training_dataset": iris,
            "unlabeled_dataset": unlabelled,
            "method": "partial",
            "hyperparameters": {"epochs": 2},
        },
    )
    plan = assert_ran_as_planned(project, job)
    arm = plan.arm("transferred")
    assert arm.examples.unlabeled == 3 * arm.examples.train  # unlabeled_ratio 3: priced too


def test_adaptation_runs_its_plan(project: Api, settings: Settings) -> None:
    source = project.upload_ok(shifted_table_csv(120, domain="source"), "source.csv", TABULAR)["id"]
    target = project.upload_ok(
        shifted_table_csv(120, domain="target", with_labels=False), "target.csv", TABULAR
    )["id"]
    job = succeeded(
        project,
        settings,
        {
            "type": "adapt",
            "base_model": "mlp",
            "source_dataset": source,
            "target_dataset": target,
            "methods": ["dann", "coral"],
            "seeds": [3, 4],
            "hyperparameters": {"epochs": 2},
        },
    )
    plan = assert_ran_as_planned(project, job)
    assert [arm.name for arm in plan.arms] == ["source_only", "dann", "coral"] and len(plan.runs()) == 6
    # The DANN discriminator's rate, decided in the worker before, is the plan's now.
    assert (
        plan.arm("dann").hyperparameters["discriminator_learning_rate"]
        == plan.arm("dann").hyperparameters["learning_rate"]
    )
    assert "discriminator_learning_rate" not in plan.arm("coral").hyperparameters


def test_distillation_runs_its_plan(project: Api, settings: Settings, iris: str, learned: str) -> None:
    job = succeeded(
        project,
        settings,
        {
            "type": "distill",
            "teacher": learned,
            "student": {"architecture": "mlp", "hidden": [8]},
            "training_dataset": iris,
            "hyperparameters": {"epochs": 2},
        },
    )
    plan = assert_ran_as_planned(project, job)
    assert [run.name for run in plan.runs()] == ["distilled student", "student alone"]
    assert plan.arm("distilled student").examples.teacher > 0  # the teacher's predictions are priced


def test_an_evaluation_job_is_planned_and_priced(settings: Settings) -> None:
    queued = settings.model_copy(update={"evaluate_sync_max_examples": 0})  # every evaluation becomes a job
    with TestClient(create_app(queued)) as client:
        api = new_project(Api(client, ADMIN_KEY))
        iris = api.upload_ok(iris_csv(), "iris.csv", TABULAR, label_column="species")["id"]
        model = succeeded(
            api, settings, {"base_model": "mlp", "training_dataset": iris, "hyperparameters": {"epochs": 2}}
        )
        response = api.post(f"/v1/models/{model['result_model']}/evaluate", json={"dataset": iris})
        assert response.status_code == 202, response.text
        plan = JobPlan.model_validate(response.json()["plan"])
        assert plan.kind == "evaluation" and plan.runs() == [] and plan.cost.forward_examples == 150
        assert plan.cost.seconds > 0


def test_a_kept_heads_warm_up_counts_like_a_new_ones(project: Api, iris: str, learned: str) -> None:
    body = {
        "base_model": learned,
        "training_dataset": iris,
        "baseline": True,
        "seeds": [1, 2, 3, 4, 5],
        "hyperparameters": {"head_warmup_epochs": 1000, "cross_validation_folds": 0},
    }
    for head in ("keep", "new"):
        response = project.create_job({**body, "head": head})
        assert response.status_code == 422, response.text
        error = response.json()["error"]
        assert (
            error["param"] == "hyperparameters.head_warmup_epochs"
            and "head warm-up epochs" in error["message"]
        )


@pytest.fixture
def limited(settings: Settings) -> Iterator[Api]:
    """A service whose jobs may cost at most 3.6 seconds of the reference machine."""
    with TestClient(create_app(settings.model_copy(update={"max_job_hours": 0.001}))) as client:
        yield new_project(Api(client, ADMIN_KEY))


def test_a_job_above_the_compute_limit_is_refused_with_its_cost(limited: Api) -> None:
    texts = limited.upload_ok(text_csv(sentiment_rows(40)), "reviews.csv", "text_classification")["id"]
    response = limited.create_job({"base_model": "minilm-l6", "training_dataset": texts, "method": "full"})
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "budget_exceeded" and error["param"] == "training_dataset"
    assert "estimated compute" in error["message"] and "GRAFT_MAX_JOB_HOURS" in error["message"]
    assert "transferred" in error["message"]
    # The same data with a frozen backbone costs a pass of features and a head: it fits.
    probe = limited.create_job(
        {"base_model": "minilm-l6", "training_dataset": texts, "method": "linear_probe"}
    )
    assert probe.status_code == 201, probe.text
    assert probe.json()["plan"]["cost"]["seconds"] < 3.6
    assert limited.get(f"/v1/jobs/{probe.json()['id']}").json()["plan"] == probe.json()["plan"]


def test_the_architecture_prices_the_job() -> None:
    """The same budget of epochs and examples costs what the network costs: a pass of minilm-l6 is
    thousands of an mlp's."""
    from graft.compute import Network
    from graft.spec import ModelSpec

    text = Network.of(ModelSpec.for_builtin("minilm-l6"), classes=2, mean_text_chars=200)
    table = Network.of(ModelSpec.for_builtin("mlp"), classes=2, columns=10)
    assert text.forward_seconds(1000) > 1000 * table.forward_seconds(1000)
    small = Network.of(ModelSpec.for_builtin("resnet-small"), classes=10)
    assert small.model_copy(update={"side": 64}).flops() > 3 * small.flops()
