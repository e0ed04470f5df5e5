"""Knowledge distillation: a smaller student learns from a teacher's softened outputs.

The student trains with the fine-tuning loop (method `full`) on transfer data; its loss per batch is

    alpha * CE(student, labels) + (1 - alpha) * T^2 * KL(softmax(teacher / T) || softmax(student / T))

where the transfer data have labels, and the KL term alone where they have none (the teacher labels them).
The teacher's logits are computed once, before training. The reference is the same student trained on the
labels alone (when there are labels): the report compares teacher, that student and the distilled one on
labelled evaluation data, with their size and CPU latency.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from graft.jobspec import DistillHyperparameters, DistillSpec, Student
from graft.plan import DataFacts, JobPlan, PlannedRun, plan_distillation
from graft.plan import Upstream as PlanUpstream
from graft.sources import BaseModelSource, DatasetSource
from graft.spec import ModelSpec
from ml.data import Inputs, Subset, batches, label_indices, load_inputs
from ml.metrics import classification_metrics
from ml.networks import TransferModel, count_parameters
from ml.runtime import Reporter, autocast_dtype, load_upstream, to_device
from ml.weights import save_weights
from workers.recipes.finetune import FinetuneConfig, FinetuneRecipe, FinetuneResult
from workers.recipes.study import RunReporter

LATENCY_BATCH = 32
LATENCY_REPEATS = 7


class DistillConfig(FinetuneConfig):
    teacher: BaseModelSource
    temperature: float = Field(default=4.0, gt=0)
    alpha: float = Field(default=0.5, ge=0, le=1)


@torch.no_grad()
def predict_logits(model: TransferModel, inputs: Inputs, device: torch.device) -> Tensor:
    model.eval()
    amp = autocast_dtype(device)
    chunks = []
    for indices in batches(len(inputs), 64, shuffle=False):
        with torch.autocast(device_type=device.type, dtype=amp, enabled=amp is not None):
            chunks.append(model(to_device(inputs.batch(indices), device)).float().cpu())
    return torch.cat(chunks)


class DistillRecipe(FinetuneRecipe):
    config: DistillConfig

    def __init__(
        self, config: DistillConfig, reporter: Reporter, teacher: TransferModel, teacher_spec: ModelSpec
    ):
        super().__init__(config, reporter)
        self.teacher = teacher
        self.teacher_spec = teacher_spec

    def training_labels(self, inputs: Inputs, labels: list[str] | None) -> Tensor:
        # The teacher sees the transfer data through its own input spec (its image size, say).
        teacher_inputs, _ = load_inputs(self.config.train, self.teacher_spec)
        self.teacher_logits = predict_logits(self.teacher.to(self.device), teacher_inputs, self.device)
        self.labelled = labels is not None
        self.reporter.event(
            f"Teacher outputs computed for {len(teacher_inputs)} transfer examples"
            + ("" if self.labelled else "; they have no labels, so the teacher's alone teach the student"),
            data={"labelled": self.labelled},
        )
        if labels is None:
            return self.teacher_logits.argmax(dim=1)
        return label_indices(labels, self.classes)

    def training_loss(self, logits: Tensor, target: Tensor, indices: list[int]) -> Tensor:
        positions = torch.as_tensor([self.train_positions[i] for i in indices])
        teacher = self.teacher_logits[positions].to(logits.device)
        t = self.config.temperature
        soft = F.kl_div(
            F.log_softmax(logits / t, dim=1),
            F.log_softmax(teacher / t, dim=1),
            reduction="batchmean",
            log_target=True,
        ) * (t * t)
        if not self.labelled:
            return soft
        alpha = self.config.alpha
        return alpha * F.cross_entropy(logits, target) + (1 - alpha) * soft


def checkpoint_bytes(model: TransferModel, spec: ModelSpec) -> int:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "model.safetensors"
        save_weights(path, {k: v.detach().cpu() for k, v in model.state_dict().items()}, spec)
        return path.stat().st_size


@torch.no_grad()
def cpu_latency_ms(model: TransferModel, inputs: Inputs) -> float:
    """Median wall time of one forward pass over a batch of up to 32 examples on the CPU, in milliseconds."""
    model = model.to("cpu").eval()
    batch = inputs.batch(list(range(min(LATENCY_BATCH, len(inputs)))))
    model(batch)  # warm-up
    times = []
    for _ in range(LATENCY_REPEATS):
        started = time.perf_counter()
        model(batch)
        times.append((time.perf_counter() - started) * 1000)
    return round(statistics.median(times), 3)


@dataclass
class DistillationStudy:
    result: FinetuneResult  # the distilled student: the job's result
    report: dict[str, Any]


def _student_model(result: FinetuneResult) -> TransferModel:
    from ml.networks import build_model

    model = build_model(result.spec, pretrained=False)
    model.load_state_dict(result.state, strict=True)
    return model


def plan_distillation_of(config: DistillConfig) -> JobPlan:
    """The plan of a distillation run from a recipe config (benchmarks, tests), made by the planner the API
    uses (graft.plan.plan_distillation), unpriced."""
    hp = {
        "temperature": config.temperature,
        "alpha": config.alpha,
        **config.hyperparameters.model_dump(mode="json"),
    }
    architecture = config.base.spec.architecture
    spec = DistillSpec(
        kind="distill",
        teacher=config.teacher.id,
        student=Student(architecture=architecture, **config.base.spec.options),  # type: ignore[arg-type]
        training_dataset=config.train.id,
        backbone="frozen" if config.method == "linear_probe" else "full",
        method=config.method,
        hyperparameters=DistillHyperparameters.model_validate(hp),
    )
    student = PlanUpstream(id=config.base.id, learned=config.base.learned, architecture=architecture)
    unknown = DataFacts(examples=0)
    return plan_distillation(
        spec, config.seed, teacher=None, student=student, train=unknown, labelled=config.train.labeled
    )


def run_distillation(
    config: DistillConfig, reporter: Reporter, plan: JobPlan | None = None
) -> DistillationStudy:
    """The job's runs, as its plan has them (graft/plan.py): the distilled student and, when the transfer
    data have labels, the same student on the labels alone (planned here without a plan)."""
    plan = plan or plan_distillation_of(config)
    teacher, teacher_spec = load_upstream(config.teacher)
    classes = list(teacher_spec.classes)
    student_config = config.model_copy(update={"classes": classes, "keep_last_epoch": True, "head": "new"})
    runs = plan.runs()
    labelled = any(run.kind == "student" for run in runs)

    def hyperparameters(run: PlannedRun) -> Any:
        return type(config.hyperparameters).model_validate(run.hyperparameters)

    distilled_run = runs[0]
    distiller = DistillRecipe(
        student_config.model_copy(
            update={"seed": distilled_run.seed, "hyperparameters": hyperparameters(distilled_run)}
        ),
        RunReporter(reporter, distilled_run.name, 0, len(runs), primary=True),
        teacher,
        teacher_spec,
    )
    distilled = distiller.run()
    scratch: FinetuneResult | None = None
    if labelled:
        alone = runs[1]
        reference = FinetuneConfig.model_validate(
            {
                **student_config.model_dump(exclude={"teacher", "temperature", "alpha", "hyperparameters"}),
                "seed": alone.seed,
                "hyperparameters": hyperparameters(alone),
                "save_checkpoints": False,
            }
        )
        scratch = FinetuneRecipe(
            reference, RunReporter(reporter, alone.name, 1, len(runs), primary=False)
        ).run()

    # The evaluation data: the evaluation dataset, else the transfer data's held-out split (the same in both
    # student runs: the split is seeded).
    assert distiller.val_inputs is not None and distiller.val_labels is not None
    evaluation_source: DatasetSource = config.validation or config.train
    teacher_inputs, _ = load_inputs(evaluation_source, teacher_spec)
    if config.validation is None:
        assert isinstance(distiller.val_inputs, Subset)
        teacher_inputs = Subset(teacher_inputs, distiller.val_inputs.indices)
    targets = distiller.val_labels.cpu()
    cpu = torch.device("cpu")
    teacher_predictions = predict_logits(teacher.to(cpu), teacher_inputs, cpu).argmax(dim=1)

    def arm(model: TransferModel, spec: ModelSpec, inputs: Inputs) -> dict[str, Any]:
        predictions = predict_logits(model.to(cpu), inputs, cpu).argmax(dim=1)
        metrics = classification_metrics(targets, predictions, classes)
        return {
            "accuracy": metrics["accuracy"],
            "macro_f1": metrics["macro_f1"],
            "agreement_with_teacher": float((predictions == teacher_predictions).float().mean()),
            "num_parameters": count_parameters(model),
            "checkpoint_bytes": checkpoint_bytes(model, spec),
            "cpu_latency_ms": cpu_latency_ms(model, inputs),
        }

    student_inputs = distiller.val_inputs
    teacher_arm = arm(teacher, teacher_spec, teacher_inputs)
    distilled_arm = arm(_student_model(distilled), distilled.spec, student_inputs)
    scratch_arm = arm(_student_model(scratch), scratch.spec, student_inputs) if scratch is not None else None
    report = distillation_report(
        teacher_arm,
        scratch_arm,
        distilled_arm,
        evaluation_examples=len(targets),
        hyperparameters={
            "temperature": config.temperature,
            "alpha": config.alpha if labelled else 0.0,
            "student": {"architecture": distilled.spec.architecture, **distilled.spec.options},
        },
        curves={
            "distilled_student": distilled.history,
            "scratch_student": scratch.history if scratch else [],
        },
    )
    reporter.event(report["summary"], data={"gap_recovered": report["gap_recovered"]})
    return DistillationStudy(result=distilled, report=report)


def distillation_report(
    teacher: dict[str, Any],
    scratch: dict[str, Any] | None,
    distilled: dict[str, Any],
    *,
    evaluation_examples: int,
    hyperparameters: dict[str, Any],
    curves: dict[str, list[dict[str, float]]],
) -> dict[str, Any]:
    gap = None
    if scratch is not None and teacher["accuracy"] - scratch["accuracy"] > 1e-9:
        gap = (distilled["accuracy"] - scratch["accuracy"]) / (teacher["accuracy"] - scratch["accuracy"])
    compression = {
        "parameters": teacher["num_parameters"] / max(distilled["num_parameters"], 1),
        "checkpoint_bytes": teacher["checkpoint_bytes"] / max(distilled["checkpoint_bytes"], 1),
        "cpu_latency": teacher["cpu_latency_ms"] / max(distilled["cpu_latency_ms"], 1e-6),
    }
    text = (
        f"Teacher {teacher['accuracy']:.3f}, distilled student {distilled['accuracy']:.3f}"
        + (f", student alone {scratch['accuracy']:.3f}" if scratch is not None else "")
        + f" accuracy on {evaluation_examples} evaluation examples"
        + (f"; distillation recovered {gap * 100:.0f}% of the gap" if gap is not None else "")
        + (
            "; the teacher is no better than the student trained alone, so there was no gap to recover"
            if scratch is not None and gap is None
            else ""
        )
        + f". The student is {compression['parameters']:.1f}x smaller and {compression['cpu_latency']:.1f}x faster "
        "on the CPU."
    )
    return {
        "object": "job.report",
        "kind": "distillation",
        "evaluation_examples": evaluation_examples,
        "teacher": teacher,
        "scratch_student": scratch,
        "distilled_student": distilled,
        "gap_recovered": gap,
        "compression": compression,
        "hyperparameters": hyperparameters,
        "learning_curves": {
            arm: [{k: row[k] for k in ("epoch", "train_loss", "val_accuracy") if k in row} for row in history]
            for arm, history in curves.items()
        },
        "summary": text,
    }
