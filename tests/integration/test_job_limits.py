"""What a job request may ask for, checked before anything is queued: strict JSON types, a bound on the
training a job makes (epoch passes and optimiser steps), and LoRA targets the architecture has. The
documented request bodies (the OpenAPI examples, the README's curl walk-through) stay valid."""

from __future__ import annotations

import inspect
import json
import re
from pathlib import Path
from typing import Any

import pytest
from pydantic import TypeAdapter

from app.core.errors import Unprocessable
from app.jobs import service
from app.jobs.planners.common import (
    MAX_EPOCH_PASSES,
    MAX_OPTIMIZER_STEPS,
    BudgetLimits,
    TrainingBudget,
    budget_of,
    check_budget,
)
from app.jobs.schemas import JobCreate
from graft.catalog import BUILTIN_MODELS, LORA_TARGET_MODULES
from graft.defaults import DISTILLATION_EPOCHS_FACTOR, resolve_hyperparameters
from graft.jobspec import (
    AdaptHyperparameters,
    AdaptSpec,
    DistillHyperparameters,
    DistillSpec,
    FinetuneHyperparameters,
    Student,
    TrainingSpec,
)
from graft.plan import DataFacts, Upstream, plan_adaptation, plan_distillation, plan_training
from tests.helpers import Api, digits_zip, iris_csv, sentiment_rows, text_csv, unlabelled_csv

TABULAR = "tabular_classification"
README = Path(__file__).resolve().parents[2] / "README.md"


@pytest.fixture
def text_dataset(api: Api) -> dict[str, Any]:
    return api.upload_ok(text_csv(sentiment_rows(20)), "reviews.csv", "text_classification")


@pytest.fixture
def image_dataset(api: Api) -> dict[str, Any]:
    return api.upload_ok(digits_zip(20), "digits.zip", "image_classification")


def training_budget(
    kind: str,
    method: str,
    hyperparameters: dict[str, Any],
    train_examples: int,
    *,
    seeds: int = 1,
    baseline: bool = False,
    adaptation_methods: list[str] | tuple[str, ...] = (),
    labelled: bool = True,
    warm_start: bool = False,
) -> TrainingBudget:
    """The budget of the plan (graft/plan.py) of a job of this kind, method and resolved hyperparameters that
    trains on `train_examples` (its held-out data elsewhere); `warm_start`: it starts from learned weights."""
    hp = {
        "learning_rate": 1e-3, "weight_decay": 0.0, "warmup_ratio": 0.0, "max_grad_norm": 1.0,
        **hyperparameters, "validation_split": 0.0,
    }  # fmt: skip
    data = DataFacts(examples=train_examples, class_counts={"a": train_examples})
    upstream = Upstream(id="base", learned=warm_start, architecture="mlp")
    seed_list = list(range(seeds)) if seeds > 1 else None
    if kind == "adapt":
        adapt_hp = AdaptHyperparameters.model_validate(
            {"adaptation_weight": 1.0, "pseudo_label_threshold": 0.9, "mcc_temperature": 2.5, **hp}
        )
        spec = AdaptSpec(
            kind="adapt", base_model="base", source_dataset="s", target_dataset="t", backbone="full",
            method=method, methods=list(adaptation_methods), seeds=seed_list, hyperparameters=adapt_hp,
        )  # fmt: skip
        return budget_of(plan_adaptation(spec, 0, upstream=upstream, source=data, target=data))
    if kind == "distill":
        distill_hp = DistillHyperparameters.model_validate({"temperature": 4.0, "alpha": 0.5, **hp})
        student = Student(architecture="mlp")
        distill = DistillSpec(
            kind="distill", teacher="t", student=student, training_dataset="d", backbone="full", method=method,
            hyperparameters=distill_hp,
        )  # fmt: skip
        return budget_of(
            plan_distillation(distill, 0, teacher=None, student=upstream, train=data, labelled=labelled)
        )
    training = TrainingSpec(
        kind=kind, base_model="base", method=method, training_dataset="d", baseline=baseline,
        baseline_arms=["scratch"] if baseline else None, seeds=seed_list,
        hyperparameters=FinetuneHyperparameters.model_validate(hp),
    )  # fmt: skip
    return budget_of(
        plan_training(training, 0, upstream=upstream, train=data, validation=DataFacts(examples=1)),
        pretraining=kind == "pretrain",
    )


def times(text: str) -> str:
    """`text` with its " x " as the service writes them (a multiplication sign)."""
    return text.replace(" x ", " \N{MULTIPLICATION SIGN} ")


def refused(response: Any, param: str) -> dict[str, Any]:
    assert response.status_code == 422, response.text
    error: dict[str, Any] = response.json()["error"]
    assert error["param"] == param, error
    return error


def many_iris_rows(copies: int) -> bytes:
    """Iris repeated: a table with the iris columns (an iris teacher can read it) and many rows."""
    header, *rows = iris_csv().decode().strip().split("\n")
    return ("\n".join([header, *rows * copies]) + "\n").encode()


# ---------------------------------------------------------------------------------------------- strict types


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"hyperparameters": {"learning_rate": "0.1"}}, "hyperparameters.learning_rate"),
        ({"hyperparameters": {"epochs": True}}, "hyperparameters.epochs"),
        ({"hyperparameters": {"epochs": "3"}}, "hyperparameters.epochs"),
        ({"hyperparameters": {"epochs": 3.0}}, "hyperparameters.epochs"),
        ({"hyperparameters": {"validation_split": "0.2"}}, "hyperparameters.validation_split"),
        ({"hyperparameters": {"freeze_batch_norm": "true"}}, "hyperparameters.freeze_batch_norm"),
        (
            {"hyperparameters": {"early_stopping": {"patience": "3"}}},
            "hyperparameters.early_stopping.patience",
        ),
        ({"baseline": "yes"}, "baseline"),
        ({"baseline": 1}, "baseline"),
        ({"seed": "7"}, "seed"),
        ({"seed": 7.0}, "seed"),
        ({"baseline": True, "seeds": [1, "2"]}, "seeds.1"),
        ({"baseline": True, "seeds": [1, True]}, "seeds.1"),
    ],
)
def test_training_requests_with_coerced_types_are_refused_naming_the_field(
    api: Api, text_dataset: dict[str, Any], body: dict[str, Any], param: str
) -> None:
    response = api.create_job({"base_model": "minilm-l6", "training_dataset": text_dataset["id"], **body})
    error = refused(response, param)
    assert error["code"] == "invalid_request"
    assert error["message"].startswith(f"{param}: ")


def test_adapt_and_distill_requests_with_coerced_types_are_refused(api: Api) -> None:
    source = api.upload_ok(iris_csv(), "iris.csv", TABULAR, label_column="species")["id"]
    target = api.upload_ok(unlabelled_csv(iris_csv(seed=1)), "iris-target.csv", TABULAR)["id"]
    adapt = {"type": "adapt", "base_model": "mlp", "source_dataset": source, "target_dataset": target}
    adapt_cases: list[tuple[dict[str, Any], str]] = [
        ({"hyperparameters": {"adaptation_weight": "1"}}, "hyperparameters.adaptation_weight"),
        ({"hyperparameters": {"epochs": "2"}}, "hyperparameters.epochs"),
        ({"seeds": [1.0]}, "seeds.0"),
    ]
    for body, param in adapt_cases:
        refused(api.post("/v1/jobs", json={**adapt, **body}), param)
    # Types are checked before the teacher is looked up: no model is needed to be refused.
    distill = {"type": "distill", "teacher": "mdl_any", "training_dataset": source}
    distill_cases: list[tuple[dict[str, Any], str]] = [
        ({"student": {"architecture": "mlp", "hidden": ["32"]}}, "student.hidden.0"),
        ({"student": {"architecture": "cnn-small", "width": 8.0}}, "student.width"),
        ({"student": {"architecture": "mlp"}, "hyperparameters": {"alpha": "0.5"}}, "hyperparameters.alpha"),
    ]
    for body, param in distill_cases:
        refused(api.post("/v1/jobs", json={**distill, **body}), param)


def test_plain_json_values_are_still_accepted_everywhere(api: Api, text_dataset: dict[str, Any]) -> None:
    """Strings for enums, integers for floats, lists of integers, string maps, nested objects, null: what
    strict validation must still take from JSON (a guard: lax validation accepted these too)."""
    response = api.create_job(
        {
            "type": "finetune",
            "base_model": "minilm-l6",
            "training_dataset": text_dataset["id"],
            "method": "partial",
            "head": "new",
            "baseline": True,
            "seeds": [1, 2],
            "seed": 3,
            "metadata": {"team": "nlp"},
            "hyperparameters": {
                "epochs": 2,
                "learning_rate": 1,
                "weight_decay": 0,
                "layer_lr_decay": 1,
                "freeze_batch_norm": False,
                "early_stopping": {"metric": "val_accuracy", "patience": 2, "min_delta": 0},
                "max_grad_norm": None,
            },
        }
    )
    assert response.status_code == 201, response.text
    job = response.json()
    assert job["hyperparameters"]["learning_rate"] == 1.0 and job["seeds"] == [1, 2]


# ----------------------------------------------------------------------------------------- training budget


def test_the_largest_baseline_study_is_refused_with_its_budget(
    api: Api, text_dataset: dict[str, Any]
) -> None:
    """The black-box report's request: 1,000 epochs, 1,000 warm-up epochs, 5 seeds, baseline, batch 1."""
    response = api.create_job(
        {
            "base_model": "minilm-l6",
            "training_dataset": text_dataset["id"],
            "baseline": True,
            "seeds": [1, 2, 3, 4, 5],
            "hyperparameters": {
                "epochs": 1000,
                "head_warmup_epochs": 1000,
                "batch_size": 1,
                "cross_validation_folds": 0,  # compared on one validation split (folds multiply the runs)
            },
        }
    )
    error = refused(response, "hyperparameters.epochs")
    assert error["code"] == "budget_exceeded"
    expected = (
        "1000 epochs x 5 seeds x 2 arms + 1000 head warm-up epochs x 5 seeds x 1 arm = 15000 epoch passes"
    )
    assert times(f"{expected}; at most 2000") in error["message"]
    assert api.get("/v1/jobs").json()["data"] == []


def test_epochs_times_seeds_times_arms_is_bounded(api: Api, text_dataset: dict[str, Any]) -> None:
    request = {"base_model": "minilm-l6", "training_dataset": text_dataset["id"], "method": "linear_probe"}
    study = {**request, "baseline": True, "seeds": [1, 2, 3, 4, 5]}
    one_split = {"cross_validation_folds": 0}  # folds multiply the runs (tested below)
    error = refused(
        api.create_job({**study, "hyperparameters": {"epochs": 1000, **one_split}}), "hyperparameters.epochs"
    )
    assert times("1000 epochs x 5 seeds x 2 arms = 10000 epoch passes; at most 2000") in error["message"]
    assert "transferred, scratch baseline" in error["message"]
    # The same epochs in a single run, or the study with fewer of them, fit.
    assert api.create_job({**request, "hyperparameters": {"epochs": 1000}}).status_code == 201
    assert api.create_job({**study, "hyperparameters": {"epochs": 200, **one_split}}).status_code == 201
    # Cross-validated (the default for a small dataset), the same study makes k-1 times the passes.
    folded = refused(api.create_job({**study, "hyperparameters": {"epochs": 200}}), "seeds")
    assert "folds" in folded["message"] and "+ the model on all labels" in folded["message"]


def test_head_warm_up_epochs_count_when_they_drive_the_budget(api: Api, text_dataset: dict[str, Any]) -> None:
    request = {"base_model": "minilm-l6", "training_dataset": text_dataset["id"], "method": "full"}
    study = {**request, "baseline": True, "seeds": [1, 2, 3]}
    error = refused(
        api.create_job({**study, "hyperparameters": {"head_warmup_epochs": 1000}}),
        "hyperparameters.head_warmup_epochs",
    )
    assert times("1000 head warm-up epochs x 3 seeds x 1 arm") in error["message"]
    # Only the transferred run warms up (the scratch baseline has random weights): one run of it fits.
    assert api.create_job({**request, "hyperparameters": {"head_warmup_epochs": 1000}}).status_code == 201


def test_seeds_are_named_when_the_default_epochs_only_overflow_with_them(api: Api) -> None:
    """A small dataset gets more epochs than the table's (120 here): times 5 seeds and 6 arms, too many."""
    source = api.upload_ok(iris_csv(30), "iris.csv", TABULAR, label_column="species")["id"]
    target = api.upload_ok(unlabelled_csv(iris_csv(30, seed=1)), "target.csv", TABULAR)["id"]
    request = {
        "type": "adapt",
        "base_model": "mlp",
        "source_dataset": source,
        "target_dataset": target,
        "methods": ["dann", "coral", "mmd", "mcc", "pseudo_label"],
    }
    error = refused(api.post("/v1/jobs", json={**request, "seeds": [1, 2, 3, 4, 5]}), "seeds")
    assert times("120 epochs x 5 seeds x 6 arms = 3600 epoch passes; at most 2000") in error["message"]
    assert "source_only, dann, coral, mmd, mcc, pseudo_label" in error["message"]
    assert api.post("/v1/jobs", json={**request, "seeds": [1, 2]}).status_code == 201


def test_batch_size_one_over_many_examples_is_bounded_in_steps(api: Api) -> None:
    table = api.upload_ok(many_iris_rows(20), "iris-3000.csv", TABULAR, label_column="species")["id"]
    request = {"base_model": "mlp", "training_dataset": table}
    error = refused(
        api.create_job({**request, "hyperparameters": {"epochs": 1000, "batch_size": 1}}),
        "hyperparameters.batch_size",
    )
    # 3,000 rows, 10% held out: 2,700 steps per epoch.
    assert times("1000 epoch passes x 2700 steps") in error["message"]
    assert f"optimiser steps; at most {MAX_OPTIMIZER_STEPS}" in error["message"]
    assert api.create_job({**request, "hyperparameters": {"batch_size": 1}}).status_code == 201
    assert api.create_job({**request, "hyperparameters": {"epochs": 1000}}).status_code == 201


def test_distillation_counts_both_students(iris_model: tuple[Api, str, str]) -> None:
    api, _dataset, teacher = iris_model
    transfer = api.upload_ok(many_iris_rows(20), "transfer.csv", TABULAR, label_column="species")["id"]
    request = {
        "type": "distill",
        "teacher": teacher,
        "student": {"architecture": "mlp", "hidden": [16]},
        "training_dataset": transfer,
    }
    error = refused(
        api.post("/v1/jobs", json={**request, "hyperparameters": {"epochs": 500, "batch_size": 1}}),
        "hyperparameters.batch_size",
    )
    assert times("1000 epoch passes x 2700 steps") in error["message"]
    assert "distilled student, student alone" in error["message"]
    assert api.post("/v1/jobs", json={**request, "hyperparameters": {"epochs": 500}}).status_code == 201


def test_the_limits_can_be_set_by_the_caller() -> None:
    """create_job takes the limits as arguments (a deployment setting, later); the formula is the same."""
    budget = training_budget(
        "adapt", "full", {"epochs": 10, "batch_size": 32, "head_warmup_epochs": 10}, 100,
        adaptation_methods=["dann", "coral"], warm_start=True,
    )  # fmt: skip
    assert budget.epoch_passes == 3 * 10 + 3 * 10 and budget.optimizer_steps == 60 * 4
    with pytest.raises(Unprocessable) as refused_here:
        check_budget(
            budget,
            BudgetLimits(epoch_passes=50),
            {},
            default_epochs=10,
            default_batch_size=32,
            methods_param=True,
        )
    assert refused_here.value.param == "methods"
    check_budget(budget, BudgetLimits(epoch_passes=60), {}, default_epochs=10, default_batch_size=32)
    keyword = inspect.signature(service.create_job).parameters["max_epoch_passes"]
    assert keyword.kind is inspect.Parameter.KEYWORD_ONLY and keyword.default == MAX_EPOCH_PASSES == 2000


def _default_budgets(train_examples: int) -> list[tuple[str, Any]]:
    """The budget of every job kind, built-in architecture and method with the default hyperparameters on
    a dataset of `train_examples` (as the service resolves them: more epochs for small data)."""
    found = []
    for architecture, model in BUILTIN_MODELS.items():
        for method in (*model.architecture_methods, "self_supervised"):
            hp = resolve_hyperparameters(architecture, method, {}, train_examples=train_examples)
            kinds: list[tuple[str, bool]] = [("pretrain", False)]
            if method != "self_supervised":
                kinds += [("finetune", False), ("finetune", True)]
            for kind, baseline in kinds:
                budget = training_budget(kind, method, hp, train_examples, baseline=baseline, warm_start=True)
                found.append((f"{kind} {architecture} {method} baseline={baseline}", budget))
        full = resolve_hyperparameters(architecture, "full", {}, train_examples=train_examples)
        budget = training_budget(
            "adapt", "full", full, train_examples, adaptation_methods=["dann"], warm_start=True
        )
        found.append((f"adapt {architecture}", budget))
        distilled = {**full, "epochs": min(full["epochs"] * DISTILLATION_EPOCHS_FACTOR, 1000)}
        for labelled in (True, False):
            budget = training_budget(
                "distill", "full", distilled, train_examples, labelled=labelled, warm_start=model.pretrained
            )
            found.append((f"distill {architecture} labelled={labelled}", budget))
    return found


@pytest.mark.parametrize("train_examples", [2, 20, 150, 1000, 10_000, 100_000])
def test_every_default_job_stays_far_below_the_limits(train_examples: int) -> None:
    for name, budget in _default_budgets(train_examples):
        assert budget.epoch_passes <= MAX_EPOCH_PASSES // 2, (name, budget)
        assert budget.optimizer_steps <= MAX_OPTIMIZER_STEPS // 2, (name, budget)


def test_the_largest_studies_with_default_epochs_fit() -> None:
    """5 seeds of a baseline study, or all 5 adaptation methods, with the default epochs for a small
    dataset (the most of them: 4x the table's)."""
    for architecture in BUILTIN_MODELS:
        for method in ("full", "linear_probe"):
            hp = resolve_hyperparameters(architecture, method, {}, train_examples=20)
            study = training_budget("finetune", method, hp, 20, seeds=5, baseline=True, warm_start=True)
            assert study.epoch_passes <= MAX_EPOCH_PASSES, (architecture, method, study)
        hp = resolve_hyperparameters(architecture, "full", {}, train_examples=20)
        methods = ["dann", "coral", "mmd", "mcc", "pseudo_label"]
        adapt = training_budget("adapt", "full", hp, 20, adaptation_methods=methods, warm_start=True)
        assert adapt.epoch_passes <= MAX_EPOCH_PASSES, (architecture, adapt)


# ------------------------------------------------------------------------------------------------- LoRA


def test_lora_targets_the_architecture_does_not_have_are_refused(
    api: Api, text_dataset: dict[str, Any], image_dataset: dict[str, Any]
) -> None:
    text = {"base_model": "minilm-l6", "training_dataset": text_dataset["id"], "method": "lora"}
    param = "hyperparameters.lora_target_modules"
    for targets in (["query", "q_proj"], ["attention"], ["LayerNorm"], ["_expand_conv"]):
        error = refused(api.create_job({**text, "hyperparameters": {"lora_target_modules": targets}}), param)
        assert "query, key, value, dense" in error["message"]
    image = {"base_model": "efficientnet-lite0", "training_dataset": image_dataset["id"], "method": "lora"}
    # The stem exists, but pads itself: peft's adapter would break the forward pass on the worker.
    error = refused(
        api.create_job({**image, "hyperparameters": {"lora_target_modules": ["_conv_stem"]}}), param
    )
    assert "_expand_conv, _project_conv, _conv_head" in error["message"]

    for body, targets in ((text, ["query", "value", "dense"]), (image, ["_project_conv"])):
        response = api.create_job({**body, "hyperparameters": {"lora_target_modules": targets}})
        assert response.status_code == 201, response.text
        assert response.json()["hyperparameters"]["lora_target_modules"] == targets


def test_the_request_schema_documents_the_lora_names(api: Api) -> None:
    schema = api.get("/openapi.json").json()["components"]["schemas"]["HyperparametersIn"]
    description = schema["properties"]["lora_target_modules"]["description"]
    for architecture, names in LORA_TARGET_MODULES.items():
        assert f"{architecture}: {', '.join(names)}" in description


# ------------------------------------------------------------------------------------ documented requests

JOB_CREATE = TypeAdapter(JobCreate)
README_MODELS = {"UPSTREAM", "MODEL", "SSL_MODEL"}  # set by earlier steps of the walk-through
DATASET_FIELDS = (
    "training_dataset",
    "validation_dataset",
    "source_dataset",
    "target_dataset",
    "evaluation_dataset",
)


def openapi_examples(api: Api) -> list[dict[str, Any]]:
    spec = api.get("/openapi.json").json()
    body = spec["paths"]["/v1/jobs"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    refs = [option["$ref"].rsplit("/", 1)[-1] for option in body["oneOf"]]
    examples = [example for ref in refs for example in spec["components"]["schemas"][ref]["examples"]]
    assert len(examples) >= 5
    return examples


def readme_job_bodies() -> list[dict[str, Any]]:
    """The JSON of every job the README creates: `curl ... $GRAFT/v1/jobs ... -d "..."`, and the walk-through's
    `create_job "..."` helper (a curl to the same route). Shell variables become placeholder ids."""
    text = README.read_text()
    quoted = r'"((?:[^"\\]|\\.)*)"'
    bodies = re.findall(r'\$GRAFT/v1/jobs\s(?:[^"\n]|"(?:[^"\\]|\\.)*"|\\\n)*?-d\s+' + quoted, text)
    bodies += re.findall(r"create_job\s+" + quoted, text)

    def placeholder(match: re.Match[str]) -> str:
        name = match.group(1)
        return f"mdl_readme_{name.lower()}" if name in README_MODELS else f"ds_readme_{name.lower()}"

    found = []
    for raw in bodies:
        if raw == "$1":  # the helper's own definition
            continue
        shell = re.sub(r'\\(["\\$])', r"\1", raw)  # what the shell makes of a double-quoted string
        found.append(json.loads(re.sub(r"\$\{?([A-Z_]+)\}?", placeholder, shell)))
    assert len(found) >= 7, found
    return found


def test_the_openapi_examples_and_readme_bodies_validate_strictly(api: Api) -> None:
    for body in [*openapi_examples(api), *readme_job_bodies()]:
        JOB_CREATE.validate_python(body)
        JOB_CREATE.validate_json(json.dumps(body))


def test_the_documented_requests_are_accepted(api: Api, text_dataset: dict[str, Any]) -> None:
    """Every documented body, sent as written except for its dataset ids: those on built-in models are
    created (on small datasets of the model's modality); those on a model trained earlier in the
    walk-through get past validation to the model lookup (404), never a 422."""
    images = [
        api.upload_ok(digits_zip(20, offset=20 * i), f"d{i}.zip", "image_classification")["id"]
        for i in range(3)
    ]
    datasets = {
        "text": dict.fromkeys(DATASET_FIELDS, text_dataset["id"]),
        "image": {
            "training_dataset": images[0],
            "source_dataset": images[0],
            "target_dataset": images[1],
            "validation_dataset": images[2],
            "evaluation_dataset": images[2],
        },
    }
    created = 0
    for body in [*openapi_examples(api), *readme_job_bodies()]:
        builtin = BUILTIN_MODELS.get(body.get("base_model", ""))
        if builtin is None:
            response = api.post("/v1/jobs", json=body)
            assert response.status_code == 404, (body, response.text)
            assert response.json()["error"]["code"] == "model_not_found", response.text
            continue
        ids = datasets[builtin.modality]
        sent = {key: ids[key] if key in DATASET_FIELDS else value for key, value in body.items()}
        response = api.post("/v1/jobs", json=sent)
        assert response.status_code == 201, (sent, response.text)
        created += 1
    assert created >= 6
