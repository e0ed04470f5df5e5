"""The planner of distill jobs: the teacher, the student architecture and its options, the transfer and
evaluation data, the defaults; its answer is a `DistillSpec`."""

from __future__ import annotations

from sqlalchemy.orm import Session

from app.core.errors import Unprocessable
from app.core.security import Principal
from app.jobs.planners.common import (
    BudgetLimits,
    Plan,
    adapter_width,
    backbone_for,
    check_companion,
    check_limits,
    epochs_by_default,
    labelled_training_dataset,
    model_upstream,
    network_for,
    resolved_budget,
)
from app.jobs.schemas import DistillJobCreate
from graft.catalog import BUILTIN_MODELS
from graft.defaults import (
    DISTILLATION_DEFAULTS,
    DISTILLATION_EPOCHS_FACTOR,
    default_hyperparameters,
    split_sizes,
)
from graft.jobspec import (
    DistillHyperparameters,
    DistillSpec,
    Student,
)
from graft.plan import DataFacts, plan_distillation
from graft.plan import Upstream as PlanUpstream
from graft.spec import ModelSpec

STUDENT_OPTIONS = {"layers": ("minilm-l6",), "width": ("cnn-small", "resnet-small"), "hidden": ("mlp",)}


def plan(
    session: Session, principal: Principal, body: DistillJobCreate, limits: BudgetLimits, seed: int
) -> Plan:
    teacher = model_upstream(session, principal, body.teacher, param="teacher")
    if not teacher.classes:
        raise Unprocessable(
            f"{teacher.base_model} has no classification head to learn from; distil a fine-tuned model",
            param="teacher",
            code="invalid_request",
        )
    student = body.student
    builtin = BUILTIN_MODELS[student.architecture]
    if builtin.modality != teacher.modality:
        raise Unprocessable(
            f"the teacher is a {teacher.modality} model and {student.architecture} a {builtin.modality} one",
            param="student.architecture",
            code="modality_mismatch",
        )
    for option, architectures in STUDENT_OPTIONS.items():
        if getattr(student, option) is not None and student.architecture not in architectures:
            raise Unprocessable(
                f"{option} applies to a {' or '.join(architectures)} student, not {student.architecture}",
                param=f"student.{option}",
                code="invalid_request",
            )
    train = labelled_training_dataset(
        session,
        principal,
        body.training_dataset,
        teacher,
        "training_dataset",
        labelled=False,
        mismatch_param="training_dataset",
    )
    unknown = sorted(set(train.classes) - set(teacher.classes)) if train.labeled else []
    if unknown:
        raise Unprocessable(
            f"dataset {train.id} has classes the teacher cannot predict: {', '.join(unknown[:5])}",
            param="training_dataset",
            code="classes_mismatch",
        )
    evaluation = None
    if body.evaluation_dataset is not None:
        evaluation = check_companion(
            session,
            principal,
            body.evaluation_dataset,
            train,
            teacher,
            "evaluation_dataset",
            classes=teacher.classes,
        )
    given = body.hyperparameters.model_dump(exclude_none=True)
    backbone, method = backbone_for(body.backbone or "full", student.architecture, builtin.pretrained)
    hyperparameters = {
        **DISTILLATION_DEFAULTS,
        **resolved_budget(
            student.architecture,
            given,
            train,
            held_out=body.evaluation_dataset is not None or not train.labeled,
            learned=builtin.pretrained,
            method=method,
        ),
        **adapter_width(backbone),
    }
    if "epochs" not in given:
        hyperparameters["epochs"] = min(hyperparameters["epochs"] * DISTILLATION_EPOCHS_FACTOR, 1000)
    held = split_sizes(dict(train.class_counts or {}), float(hyperparameters["validation_split"]))[1]
    if body.evaluation_dataset is None and (not train.labeled or not held):
        raise Unprocessable(
            "the report compares teacher and students on labelled data: give an evaluation_dataset, or labelled "
            "transfer data with a validation_split above 0 that holds examples"
            + (
                ""
                if not train.labeled or not hyperparameters["validation_split"]
                else f" ({train.id}'s holds none)"
            ),
            param="evaluation_dataset",
            code="invalid_request",
        )
    held_out = body.evaluation_dataset is not None or not train.labeled
    spec = DistillSpec(
        kind="distill",
        teacher=teacher.base_model,
        student=Student.model_validate(student.model_dump(exclude_none=True)),
        training_dataset=train.id,
        evaluation_dataset=body.evaluation_dataset,
        backbone=backbone,
        method=method,
        hyperparameters=DistillHyperparameters.model_validate(hyperparameters),
    )
    student_spec = ModelSpec.for_builtin(student.architecture).model_copy(
        update={"options": spec.student.options()}
    )
    classes = len(teacher.classes)
    runs = plan_distillation(
        spec,
        seed,
        teacher=network_for(teacher.spec, learned=True, data=train, classes=classes),
        student=PlanUpstream(
            id=f"{student.architecture} student",
            learned=builtin.pretrained,
            architecture=student.architecture,
            network=network_for(
                student_spec,
                learned=builtin.pretrained,
                data=train,
                classes=classes,
                adapter=hyperparameters.get("adapter_hidden"),
            ),
        ),
        train=DataFacts.of(train),
        labelled=train.labeled,
        evaluation=DataFacts.of(evaluation) if evaluation is not None else None,
    )
    default_epochs = epochs_by_default(student.architecture, given, train, held_out=held_out, method=method)
    check_limits(
        runs,
        limits,
        given,
        default_epochs=min(default_epochs * DISTILLATION_EPOCHS_FACTOR, 1000),
        default_batch_size=default_hyperparameters(student.architecture, method)["batch_size"],
        seeds=1,
    )
    return Plan(
        spec,
        runs,
        f"Job created: distil {teacher.base_model} into a {student.architecture} student on {train.id} "
        f"({backbone} backbone)",
    )
