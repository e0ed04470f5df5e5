"""Each job kind is modelled once: the API's planner resolves a request into the kind's spec, the row
keeps it (its listing columns drawn from it), the worker reads it back; rows stored before specs get
theirs from their columns (migration 0009)."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from sqlalchemy import select

from app.cli import ROOT
from graft import job_store, jobspec
from graft.config import Settings
from graft.db import make_engine, make_session_factory, session_scope
from graft.jobspec import AdaptSpec, DistillSpec, EvaluateSpec, TrainingSpec
from graft.tables import Job, Model
from tests.conftest import Backend, _create_postgres_database, _drop_postgres_database
from tests.helpers import Api, iris_csv, shifted_table_csv
from tests.integration.conftest import run_in_process

TABULAR = "tabular_classification"


def job_row(settings: Settings, job_id: str) -> Job:
    engine = make_engine(settings.effective_database_url)
    try:
        with session_scope(make_session_factory(engine)) as session:
            job = session.scalar(select(Job).where(Job.id == job_id))
            assert job is not None
            session.expunge(job)
            return job
    finally:
        engine.dispose()


def assert_columns_drawn_from_spec(job: Job) -> Any:
    spec = jobspec.parse(job.spec or {})
    for name, value in jobspec.columns(spec).items():
        assert getattr(job, name) == value, name
    return spec


def test_each_kind_is_stored_as_its_spec_and_run_from_it(
    api: Api, settings: Settings, iris_model: tuple[Api, str, str]
) -> None:
    iris = api.upload_ok(iris_csv(), "iris.csv", TABULAR, label_column="species")
    source = api.upload_ok(shifted_table_csv(200, domain="source"), "source.csv", TABULAR)
    target = api.upload_ok(shifted_table_csv(200, domain="target", with_labels=False), "target.csv", TABULAR)

    finetune = api.create_job(
        {
            "base_model": "mlp",
            "training_dataset": iris["id"],
            "hyperparameters": {"epochs": 3, "max_grad_norm": 5},
        }
    ).json()
    adapt = api.create_job(
        {
            "type": "adapt",
            "base_model": "mlp",
            "source_dataset": source["id"],
            "target_dataset": target["id"],
            "hyperparameters": {"epochs": 2},
        }
    ).json()

    spec = assert_columns_drawn_from_spec(job_row(settings, finetune["id"]))
    assert isinstance(spec, TrainingSpec) and spec.version == 1 and spec.kind == "finetune"
    assert spec.hyperparameters.epochs == 3 and spec.hyperparameters.max_grad_norm == 5.0
    # The job shows what was resolved, as before: the options the planner set, none it left unset.
    assert finetune["hyperparameters"] == jobspec.resolved(spec.hyperparameters)
    assert "lora_rank" not in finetune["hyperparameters"]

    spec = assert_columns_drawn_from_spec(job_row(settings, adapt["id"]))
    assert isinstance(spec, AdaptSpec)
    assert (spec.source_dataset, spec.target_dataset) == (source["id"], target["id"])
    assert spec.backbone == "full" and spec.method == "full"  # mlp: random weights train whole
    assert adapt["training_dataset"] == source["id"]  # the listing column keeps its name

    # The worker runs the job from its spec alone: a changed listing column changes nothing.
    engine = make_engine(settings.effective_database_url)
    try:
        with session_scope(make_session_factory(engine)) as session:
            session.execute(
                sa.update(Job).where(Job.id == finetune["id"]).values(hyperparameters={"epochs": 99})
            )
    finally:
        engine.dispose()
    run_in_process(settings, finetune["id"])
    done = api.get(f"/v1/jobs/{finetune['id']}").json()
    assert done["status"] == "succeeded", done["error"]
    assert done["progress"]["epochs"] == 3

    # An evaluate job (the API queues one for a large dataset) is its spec too, run by its handler.
    owner, dataset, model = iris_model
    engine = make_engine(settings.effective_database_url)
    try:
        with session_scope(make_session_factory(engine)) as session:
            project = session.scalar(select(Model.project_id).where(Model.id == model))
            assert project is not None
            row = job_store.new_job(
                project, EvaluateSpec(kind="evaluate", model=model, dataset=dataset), seed=0
            )
            job_store.add(session, row)
            evaluate_id = row.id
    finally:
        engine.dispose()
    row = job_row(settings, evaluate_id)
    assert assert_columns_drawn_from_spec(row) == EvaluateSpec(kind="evaluate", model=model, dataset=dataset)
    assert (row.base_model, row.validation_dataset) == (model, dataset)
    run_in_process(settings, evaluate_id)
    scored = owner.get(f"/v1/jobs/{evaluate_id}").json()
    assert scored["status"] == "succeeded", scored["error"]
    assert scored["metrics"]["accuracy"] > 0.8


def test_a_spec_out_of_the_api_bounds_is_refused_where_it_is_read(api: Api, settings: Settings) -> None:
    """One schema: the bounds the API enforces are the ones the worker reads with."""
    iris = api.upload_ok(iris_csv(), "iris.csv", TABULAR, label_column="species")
    job = api.create_job({"base_model": "mlp", "training_dataset": iris["id"]}).json()
    row = job_row(settings, job["id"])
    stored = dict(row.spec or {})
    stored["hyperparameters"] = {**stored["hyperparameters"], "validation_split": 0.9}
    with pytest.raises(ValueError, match="validation_split"):
        jobspec.parse(stored)
    refused = api.create_job(
        {"base_model": "mlp", "training_dataset": iris["id"], "hyperparameters": {"validation_split": 0.9}}
    )
    assert refused.status_code == 422 and "validation_split" in refused.text


@pytest.fixture
def fresh_database(backend: Backend, tmp_path: Path) -> Iterator[str]:
    if backend.database_url is None:
        yield f"sqlite:///{tmp_path / 'old.db'}"
        return
    url = _create_postgres_database(backend.database_url)
    try:
        yield url
    finally:
        _drop_postgres_database(url, backend.database_url)


def _alembic(url: str) -> Config:
    config = Config(str(ROOT / "alembic.ini"))
    config.set_main_option("script_location", str(ROOT / "migrations"))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    config.attributes["configure_logging"] = False
    return config


OLD_ROWS: list[dict[str, Any]] = [
    {
        "type": "finetune",
        "base_model": "mdl_upstream",
        "training_dataset": "ds_labels",
        "validation_dataset": "ds_val",
        "evaluation_dataset": "ds_eval",
        "method": "partial",
        "hyperparameters": {
            "epochs": 5, "batch_size": 16, "learning_rate": 0.001, "weight_decay": 0.01, "validation_split": 0.1,
            "warmup_ratio": 0.1, "max_grad_norm": 1.0, "unfreeze_blocks": 1, "cross_validation_folds": 5,
        },
        "head": "keep",
        "baseline": True,
        "baseline_arms": ["scratch", "parent"],
        "seeds": [1, 2],
    },
    {
        "type": "adapt",
        "base_model": "minilm-l6",
        "training_dataset": "ds_source",
        "target_dataset": "ds_target",
        "method": "linear_probe",
        "methods": ["mmd", "dann"],
        "hyperparameters": {
            "epochs": 5, "batch_size": 32, "learning_rate": 0.001, "weight_decay": 0.0, "validation_split": 0.1,
            "warmup_ratio": 0.1, "max_grad_norm": 1.0, "adaptation_weight": 1.0, "pseudo_label_threshold": 0.9,
            "mcc_temperature": 2.5, "adapter_hidden": 256,
        },
    },
    {
        "type": "distill",
        "base_model": "mdl_teacher",
        "training_dataset": "ds_transfer",
        "method": "full",
        "student": {"architecture": "minilm-l6", "layers": 2},
        "hyperparameters": {
            "epochs": 9, "batch_size": 32, "learning_rate": 0.0001, "weight_decay": 0.01, "validation_split": 0.1,
            "warmup_ratio": 0.1, "max_grad_norm": 1.0, "temperature": 4.0, "alpha": 0.5,
        },
    },
    {"type": "evaluate", "base_model": "mdl_scored", "validation_dataset": "ds_scored", "hyperparameters": {}},
]  # fmt: skip


def test_rows_stored_before_specs_get_theirs_from_their_columns(fresh_database: str) -> None:
    config = _alembic(fresh_database)
    command.upgrade(config, "0008")
    engine = sa.create_engine(fresh_database)
    now = datetime.now(UTC)
    metadata = sa.MetaData()
    metadata.reflect(engine, only=["projects", "jobs"])
    projects, jobs = metadata.tables["projects"], metadata.tables["jobs"]
    ids = []
    with engine.begin() as connection:
        connection.execute(projects.insert().values(id="prj_old", name="old", created_at=now))
        for row in OLD_ROWS:
            ids.append(f"job_{secrets.token_hex(6)}")
            connection.execute(
                jobs.insert().values(
                    id=ids[-1], project_id="prj_old", status="succeeded", seed=3, cancel_requested=False,
                    attempts=1, created_at=now, **row,
                )
            )  # fmt: skip
    engine.dispose()
    command.upgrade(config, "head")

    engine = make_engine(fresh_database)
    try:
        with session_scope(make_session_factory(engine)) as session:
            stored = {job.id: job for job in session.scalars(select(Job))}
            specs = [assert_columns_drawn_from_spec(stored[job_id]) for job_id in ids]
    finally:
        engine.dispose()
    finetune, adapt, distill, evaluate = specs
    assert isinstance(finetune, TrainingSpec)
    assert (finetune.kind, finetune.method, finetune.head) == ("finetune", "partial", "keep")
    assert (
        finetune.baseline_arms == ["scratch", "parent"]
        and finetune.hyperparameters.cross_validation_folds == 5
    )
    assert isinstance(adapt, AdaptSpec)
    assert (adapt.source_dataset, adapt.backbone, adapt.methods) == ("ds_source", "frozen", ["mmd", "dann"])
    assert adapt.hyperparameters.adapter_hidden == 256
    assert isinstance(distill, DistillSpec)
    assert (distill.teacher, distill.student.layers, distill.backbone) == ("mdl_teacher", 2, "full")
    assert evaluate == EvaluateSpec(kind="evaluate", model="mdl_scored", dataset="ds_scored")
