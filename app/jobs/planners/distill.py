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
    check_budget,
    check_companion,
    count_train_examples,
    epochs_by_default,
    labelled_training_dataset,
    model_upstream,
    resolved_budget,
    training_budget,
)
from app.jobs.schemas import DistillJobCreate
from graft.catalog import BUILTIN_MODELS
from graft.defaults import (
    DISTILLATION_DEFAULTS,
    DISTILLATION_EPOCHS_FACTOR,
    default_hyperparameters,
)
from graft.jobspec import (
    DistillHyperparameters,
    DistillSpec,
    Student,
)

STUDENT_OPTIONS = {"layers": ("minilm-l6",), "width": ("cnn-small", "resnet-small"), "hidden": ("mlp",)}


def plan(session: Session, principal: Principal, body: DistillJobCreate, limits: BudgetLimits) -> Plan:
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
    if body.evaluation_dataset is not None:
        check_companion(
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
    if body.evaluation_dataset is None and (not train.labeled or not hyperparameters["validation_split"]):
        raise Unprocessable(
            "the report compares teacher and students on labelled data: give an evaluation_dataset, or labelled "
            "transfer data with a validation_split above 0",
            param="evaluation_dataset",
            code="invalid_request",
        )
    held_out = body.evaluation_dataset is not None or not train.labeled
    budget = training_budget(
        "distill",
        method,
        hyperparameters,
        count_train_examples(student.architecture, given, train, held_out=held_out, method=method),
        labelled=train.labeled,
        warm_start=builtin.pretrained,  # the student always gets a new head (the teacher's classes)
    )
    default_epochs = epochs_by_default(student.architecture, given, train, held_out=held_out, method=method)
    check_budget(
        budget,
        limits,
        given,
        default_epochs=min(default_epochs * DISTILLATION_EPOCHS_FACTOR, 1000),
        default_batch_size=default_hyperparameters(student.architecture, method)["batch_size"],
    )
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
    return Plan(
        spec,
        f"Job created: distil {teacher.base_model} into a {student.architecture} student on {train.id} "
        f"({backbone} backbone)",
    )
