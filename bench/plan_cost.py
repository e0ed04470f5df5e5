"""Benchmark: what a job's plan says it costs against what it costs. For every kind of job and every built-in
architecture, a job is created through the service (its plan priced by the API: graft/plan.py,
graft/compute.py) and run by the real runner in this process (as a worker runs it); its wall time and CPU
time are set beside the plan's estimate. The ratio is what the compute limit means in time: the largest
job the limit accepts (GRAFT_MAX_JOB_HOURS of estimated compute) runs that many times the limit.

Also the reference machine's speeds that graft/compute.py uses, measured: each architecture's forward pass
(batched, no gradients) in FLOPs per second, and a training example's cost in forward passes.

    .venv/bin/python -m bench.plan_cost [--runs 3] [--only mlp]
"""

from __future__ import annotations

import argparse
import resource
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bench.common import command_line, markdown_table, median, report, review_rows
from graft.compute import Network, training_factor
from graft.spec import ModelSpec

NAME = "plan_cost"


@dataclass
class Case:
    architecture: str
    kind: str  # what the row says the job is
    body: Callable[[dict[str, str]], dict[str, Any]]  # the request, from the dataset and model ids


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def cases() -> list[Case]:
    def finetune(
        base: str, data: str, method: str, **more: Any
    ) -> Callable[[dict[str, str]], dict[str, Any]]:
        return lambda ids: {
            "base_model": ids.get(base, base),
            "training_dataset": ids[data],
            "method": method,
            **more,
        }

    found: list[Case] = []
    for arch, data, target in (
        ("mlp", "table", "table_target"),
        ("cnn-small", "images", "images_target"),
        ("resnet-small", "images", "images_target"),
    ):
        learned = f"{arch}:learned"
        found += [
            Case(
                arch,
                "pretrain (from scratch)",
                lambda ids, a=arch, d=data: {"type": "pretrain", "base_model": a, "training_dataset": ids[d]},
            ),
            Case(
                arch,
                "finetune full + baseline",
                finetune(learned, data, "full", baseline=True, hyperparameters={"cross_validation_folds": 0}),
            ),
            Case(arch, "finetune linear_probe", finetune(learned, data, "linear_probe")),
            Case(arch, "finetune partial", finetune(learned, data, "partial")),
            Case(
                arch,
                "pretrain self_supervised",
                lambda ids, a=arch, d=data: {
                    "type": "pretrain",
                    "base_model": a,
                    "method": "self_supervised",
                    "training_dataset": ids[d],
                },
            ),
            Case(
                arch,
                "adapt mmd",
                lambda ids, a=arch, d=data, t=target: {
                    "type": "adapt",
                    "base_model": a,
                    "source_dataset": ids[d],
                    "target_dataset": ids[t],
                },
            ),
            Case(
                arch,
                "distill",
                lambda ids, a=arch, d=data: {
                    "type": "distill",
                    "teacher": ids[f"{a}:learned"],
                    "student": {"architecture": a},
                    "training_dataset": ids[d],
                },
            ),
        ]
        if arch != "mlp":
            found.append(Case(arch, "finetune lora", finetune(learned, data, "lora")))
    # Many small steps: what a step costs beside its examples (the loop, AdamW over every parameter).
    found += [
        Case(
            "mlp",
            "finetune full, batch_size 1",
            finetune("mlp:learned", "table", "full", hyperparameters={"batch_size": 1, "epochs": 8}),
        ),
        Case(
            "minilm-l6",
            "finetune full, batch_size 1",
            finetune("minilm-l6", "texts", "full", hyperparameters={"batch_size": 1, "epochs": 1}),
        ),
    ]
    for arch, data, target in (
        ("efficientnet-lite0", "images", "images_target"),
        ("minilm-l6", "texts", "texts_target"),
    ):
        found += [
            Case(
                arch,
                "finetune linear_probe + baseline (3 epochs)",
                finetune(
                    arch,
                    data,
                    "linear_probe",
                    baseline=True,
                    hyperparameters={"cross_validation_folds": 0, "epochs": 3},
                ),
            ),
            Case(arch, "finetune full", finetune(arch, data, "full", hyperparameters={"epochs": 2})),
            Case(arch, "finetune partial", finetune(arch, data, "partial", hyperparameters={"epochs": 2})),
            Case(arch, "finetune lora", finetune(arch, data, "lora", hyperparameters={"epochs": 2})),
            Case(
                arch,
                "adapt mmd (frozen)",
                lambda ids, a=arch, d=data, t=target: {
                    "type": "adapt",
                    "base_model": a,
                    "source_dataset": ids[d],
                    "target_dataset": ids[t],
                },
            ),
            Case(
                arch,
                "pretrain self_supervised",
                lambda ids, a=arch, d=data: {
                    "type": "pretrain",
                    "base_model": a,
                    "method": "self_supervised",
                    "training_dataset": ids[d],
                    "hyperparameters": {"epochs": 1},
                },
            ),
        ]
    return found


def _datasets(api: Any) -> dict[str, str]:
    from tests.helpers import digits_table_csv, digits_zip, text_csv, unlabelled_csv

    texts = review_rows(240, seed=0)
    return {
        "table": api.upload_ok(
            digits_table_csv(range(10), 600), "digits.csv", "tabular_classification", label_column="digit"
        )["id"],
        "table_target": api.upload_ok(
            unlabelled_csv(digits_table_csv(range(10), 300, offset=600)),
            "target.csv",
            "tabular_classification",
        )["id"],
        "images": api.upload_ok(digits_zip(200, classes=range(10)), "digits.zip", "image_classification")[
            "id"
        ],
        "images_target": api.upload_ok(
            digits_zip(100, classes=range(10), offset=200), "more.zip", "image_classification"
        )["id"],
        "texts": api.upload_ok(text_csv(texts), "reviews.csv", "text_classification")["id"],
        "texts_target": api.upload_ok(text_csv(review_rows(120, seed=1)), "more.csv", "text_classification")[
            "id"
        ],
    }


def measure_jobs(runs: int, only: str | None, kind: str | None = None) -> list[dict[str, Any]]:
    from fastapi.testclient import TestClient

    from app.cli import prestart
    from app.main import create_app
    from tests.conftest import ADMIN_KEY, Backend, make_settings
    from tests.helpers import Api, new_project
    from tests.integration.conftest import run_in_process

    home = Path(tempfile.mkdtemp(prefix="graft-plan-cost-"))
    settings = make_settings(Backend("embedded", None, None), home, reaper_interval_seconds=0)
    prestart(settings)
    rows = []
    with TestClient(create_app(settings)) as client:
        api = new_project(Api(client, ADMIN_KEY))
        ids = _datasets(api)
        for arch, data in (("mlp", "table"), ("cnn-small", "images"), ("resnet-small", "images")):
            created = api.create_job(
                {
                    "type": "pretrain",
                    "base_model": arch,
                    "training_dataset": ids[data],
                    "hyperparameters": {"epochs": 2},
                }
            )
            assert created.status_code == 201, created.text
            job = created.json()
            run_in_process(settings, job["id"])
            ids[f"{arch}:learned"] = api.get(f"/v1/jobs/{job['id']}").json()["result_model"]
        for case in cases():
            if (only and case.architecture != only) or (kind and kind not in case.kind):
                continue
            walls, cpus, estimate, kept = [], [], 0.0, None
            for _ in range(runs):
                response = api.create_job(case.body(ids))
                if response.status_code != 201:
                    kept = response.json()["error"]["message"][:120]
                    break
                job = response.json()
                estimate = job["plan"]["cost"]["seconds"]
                started, cpu = time.perf_counter(), _cpu()
                run_in_process(settings, job["id"])
                walls.append(time.perf_counter() - started)
                cpus.append(_cpu() - cpu)
                done = api.get(f"/v1/jobs/{job['id']}").json()
                assert done["status"] == "succeeded", (case.kind, done["error"])
            if kept is not None:
                print(f"{case.architecture} {case.kind}: refused ({kept})", flush=True)
                continue
            row = {
                "architecture": case.architecture,
                "kind": case.kind,
                "runs": sum(arm["runs"] for arm in job["plan"]["arms"]),
                "estimate": estimate,
                "wall": median(walls),
                "cpu": median(cpus),
                "walls": walls,
            }
            rows.append(row)
            print(
                f"{case.architecture:20s} {case.kind:36s} estimated {estimate:7.1f} s, measured {row['wall']:7.1f} s "
                f"(ratio {row['wall'] / estimate:4.2f}; runs {', '.join(f'{w:.1f}' for w in walls)})",
                flush=True,
            )
    return rows


def _per_example(fn: Callable[[], None], n: int) -> float:
    fn()
    found = []
    for _ in range(5):
        started = time.perf_counter()
        fn()
        found.append(time.perf_counter() - started)
    return statistics.median(found) / n


def speed_of(architecture: str, change: dict[str, Any], facts: dict[str, Any]) -> list[str]:
    """One architecture's forward FLOPs per second and a training example's cost in forward passes."""
    from ml.networks import build_model

    spec = ModelSpec.for_builtin(architecture).with_classes([str(i) for i in range(10)])
    spec = spec.model_copy(update={k: {**getattr(spec, k), **v} for k, v in change.items()})
    network = Network.of(spec, **facts)
    # Package weights where the architecture has them: random ones make some networks' activations
    # subnormal, and an EfficientNet's forward pass four times slower than it is.
    model = build_model(spec, pretrained=True)
    n = 32
    batch: Any
    if spec.modality == "image":
        batch = torch.randn(n, network.channels or 3, network.side or 32, network.side or 32)
    elif spec.modality == "text":
        tokens = int(network.tokens or 64)
        batch = {
            "input_ids": torch.randint(1000, 5000, (n, tokens)),
            "attention_mask": torch.ones(n, tokens, dtype=torch.long),
        }
    else:
        batch = torch.randn(n, network.columns or 1)
    labels = torch.randint(0, 10, (n,))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def forward() -> None:
        model.eval()
        with torch.no_grad():
            model(batch)

    def train() -> None:
        model.train()
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(batch), labels).backward()
        optimizer.step()

    per_forward, per_train = _per_example(forward, n), _per_example(train, n)
    priced = network.forward_seconds(1)
    return [
        architecture,
        f"{network.flops() / 1e6:.1f}",
        f"{per_forward * 1e3:.3f} / {priced * 1e3:.3f}",
        f"{per_train * 1e3:.3f} / {priced * training_factor(network, 'full') * 1e3:.3f}",
    ]


def measure_speeds() -> list[list[str]]:
    torch.manual_seed(0)
    shapes: list[tuple[str, dict[str, Any], dict[str, Any]]] = [
        ("mlp", {"options": {"in_features": 64, "hidden": [128, 128]}}, {"columns": 64}),
        ("cnn-small", {}, {}),
        (
            "resnet-small",
            {"input_spec": {"height": 32, "width": 32, "channels": 1, "mean": [0.5], "std": [0.5]}},
            {},
        ),
        ("efficientnet-lite0", {}, {}),
        ("minilm-l6", {}, {"mean_text_chars": 4 * 62}),
    ]
    rows = []
    for architecture, change, facts in shapes:
        rows.append(speed_of(architecture, change, facts))
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--only", default=None, help="one architecture")
    parser.add_argument("--kind", default=None, help="only the jobs whose description holds this")
    args = parser.parse_args()
    speeds = measure_speeds()
    rows = measure_jobs(args.runs, args.only, args.kind)
    ratios = [row["wall"] / row["estimate"] for row in rows]
    table = markdown_table(
        [
            "architecture",
            "job",
            "runs in it",
            "estimated",
            "measured (median wall)",
            "CPU time",
            "measured / estimated",
        ],
        [
            [
                row["architecture"],
                row["kind"],
                row["runs"],
                f"{row['estimate']:.1f} s",
                f"{row['wall']:.1f} s",
                f"{row['cpu']:.1f} s",
                f"{row['wall'] / row['estimate']:.2f}",
            ]
            for row in rows
        ],
    )
    speed_table = markdown_table(
        [
            "architecture",
            "forward MFLOP per example",
            "forward ms per example, measured / priced",
            "training ms per example (full), measured / priced",
        ],
        speeds,
    )
    body = (
        "Each job made by the service's planner with the defaults (the epochs the data size gets, except where "
        "the row says), on small sets: 600 rows of the digits table (64 columns, 10 classes), 200 digit images "
        "(32 px, grey, 10 classes), 240 short reviews; its plan's estimate (`plan.cost.seconds`) against the "
        f"wall time the real runner took in this process, median of {args.runs} runs.\n\n"
        + table
        + f"\n\nmeasured / estimated: median {statistics.median(ratios):.2f}, from {min(ratios):.2f} to "
        f"{max(ratios):.2f}. The largest job the compute limit accepts ({'GRAFT_MAX_JOB_HOURS'}, 24 hours by "
        f"default) runs at most {max(ratios) * 24:.0f} hours here.\n\n"
        "One batch of 32 through each network alone, against what graft/compute.py prices it at (the constants "
        "were fitted to the jobs above, where data loading, augmentation, the feature cache and the loop's "
        "own work take their share; an isolated forward pass is not a job's):\n\n" + speed_table
    )
    report(
        NAME, "What a job's plan says it costs, against what it costs", command_line("bench.plan_cost"), body
    )


if __name__ == "__main__":
    main()
