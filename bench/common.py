"""What the benchmarks share: the machine's description, timing statistics, markdown output and the
docs file, review-like text data, and the hand-written training loop the baselines run."""

from __future__ import annotations

import datetime as dt
import math
import os
import platform
import random
import re
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "benchmarks.md"
T = TypeVar("T")


# ---------------------------------------------------------------- the machine


@dataclass(frozen=True)
class Machine:
    cpu: str
    cores: int
    ram_gib: float
    torch_version: str
    torch_threads: int
    python: str

    def markdown(self) -> str:
        return (
            f"{self.cpu}, {self.cores} cores, {self.ram_gib:.1f} GiB RAM; Python {self.python}, "
            f"torch {self.torch_version} with {self.torch_threads} threads"
        )


def _proc_value(path: str, key: str) -> str | None:
    try:
        for line in Path(path).read_text().splitlines():
            name, _, value = line.partition(":")
            if name.strip() == key:
                return value.strip()
    except OSError:
        return None
    return None


def machine() -> Machine:
    memory = _proc_value("/proc/meminfo", "MemTotal")  # "24576000 kB"
    ram_gib = int(memory.split()[0]) / 1024**2 if memory else 0.0
    return Machine(
        cpu=_proc_value("/proc/cpuinfo", "model name") or platform.processor() or "unknown CPU",
        cores=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 0,
        ram_gib=ram_gib,
        torch_version=torch.__version__,
        torch_threads=torch.get_num_threads(),
        python=platform.python_version(),
    )


# ---------------------------------------------------------------- numbers


def timed(fn: Callable[[], T]) -> tuple[float, T]:
    """(wall seconds, result) of one call."""
    started = time.perf_counter()
    result = fn()
    return time.perf_counter() - started, result


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def seconds(value: float) -> str:
    return f"{value:.2f} s"


def runs_list(values: Sequence[float], unit: str = "", digits: int = 2) -> str:
    return ", ".join(f"{v:.{digits}f}{unit}" for v in values)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


# ---------------------------------------------------------------- docs/benchmarks.md

DOCS_INTRO = """# Benchmarks

Benchmarks of Graft's training path. Run one from the repository root, or all with `make bench`:

```sh
.venv/bin/python -m bench.feature_cache
.venv/bin/python -m bench.service_overhead
.venv/bin/python -m bench.defaults
.venv/bin/python -m bench.adaptation
.venv/bin/python -m bench.distillation
.venv/bin/python -m bench.transferability
.venv/bin/python -m bench.job_creation
.venv/bin/python -m bench.plan_cost
```

- `bench.feature_cache`: a `linear_probe` job's training (the recipe, with its feature cache starting
  empty, so its one pass of the frozen backbone is included) against the same training that recomputes
  the frozen backbone for every batch of every epoch. Wall times, their ratio, and both validation
  accuracies (they should learn the same head).
- `bench.service_overhead`: fine-tuning jobs through the real service (uvicorn API and Celery worker
  processes, embedded SQLite and filesystem broker, driven over HTTP) against a minimal hand-written
  PyTorch loop with the same model, data, hyperparameters and seeds: training time (the sum of the job's
  `epoch_seconds` against the loop's epochs), the latency from submitting a job to its first training
  step (cold and warm worker) and from its last epoch to `succeeded`, and the validation accuracy of
  both over three seeds.
- `bench.defaults`: what a job with no hyperparameters reaches, for every (architecture, method).
- `bench.adaptation`: adapt jobs' methods beside source_only on two domain-shift pairs, three seeds.
- `bench.distillation`: teacher, student trained alone and distilled student.
- `bench.transferability`: the transferability scores against the accuracy fine-tuning really reached.
- `bench.job_creation`: many clients creating jobs at once against one uvicorn worker, on SQLite and on
  PostgreSQL, against the service at an earlier revision run alternately.
- `bench.plan_cost`: every kind of job on every built-in architecture, its plan's estimated cost against
  the time the real runner takes; and the speeds the estimate is made with, measured.

Each script prints its tables and rewrites its own section below (between its `<!-- bench:... -->`
markers), leaving the rest of this file alone. Figures depend on the machine (CPU, cores, threads, disk),
so each section says where it ran; compare the ratios, which each script measures against a baseline
run alternately in the same process, rather than seconds across machines.
"""


def command_line(module: str) -> str:
    """The exact command that is running, as a user would type it from the repository root."""
    return " ".join([".venv/bin/python", "-m", module, *sys.argv[1:]])


def section(title: str, command: str, body: str) -> str:
    """A docs section with the standard header: the exact command, the date and the machine."""
    now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    return (
        f"## {title}\n\n"
        f"- Command: `{command}`\n"
        f"- Date: {now}\n"
        f"- Machine: {machine().markdown()}\n\n"
        f"{body.strip()}\n"
    )


def write_section(name: str, content: str, path: Path = DOCS) -> None:
    """Put `content` between the `<!-- bench:name -->` markers of the docs file, keeping the rest."""
    start, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
    block = f"{start}\n{content.strip()}\n{end}"
    text = path.read_text() if path.exists() else DOCS_INTRO
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.DOTALL)
    if pattern.search(text):
        text = pattern.sub(lambda _match: block, text, count=1)
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def report(name: str, title: str, command: str, body: str) -> None:
    """Print a benchmark's result and write it to its docs section."""
    content = section(title, command, body)
    print("\n" + content)
    write_section(name, content)
    print(f"(written to {DOCS.relative_to(ROOT)}, section {name})")


# ---------------------------------------------------------------- data

_SUBJECTS = [
    "the film", "the movie", "the acting", "the story", "the script", "the soundtrack", "the direction",
    "the cast", "the ending", "the dialogue", "the cinematography", "the pacing", "the lead actress",
    "the plot", "the humour", "the final act", "the score", "the set design",
]  # fmt: skip
_POSITIVE = [
    "wonderful", "brilliant", "delightful", "superb", "moving", "charming", "gripping", "hilarious",
    "beautiful", "excellent", "clever", "heartfelt", "stunning", "memorable", "fresh", "touching",
]  # fmt: skip
_NEGATIVE = [
    "terrible", "dull", "tedious", "awful", "boring", "lifeless", "clumsy", "predictable",
    "forgettable", "painful", "shallow", "messy", "dreadful", "lazy", "bland", "confusing",
]  # fmt: skip
_INTENSIFIERS = ["", "really ", "truly ", "quite ", "absolutely ", "rather ", "incredibly ", "so "]
_NOUNS = ["film", "movie", "experience", "evening at the cinema", "ride", "story", "sequel", "drama"]
_FILLERS = ["", " indeed", " overall", " to be honest", " in my opinion", " if you ask me", "!"]
_TEMPLATES = [
    "{S} was {i}{a}{f}",
    "I thought {s} was {i}{a}{f}",
    "{S} felt {i}{a}, and {s2} was {a2}{f}",
    "what a {i}{a} {n}{f}",
    "honestly, {s} is {i}{a}{f}",
    "not {o} at all: {s} was {i}{a}{f}",
    "{S} was {a}, even if {s2} was a bit {o}",
    "I expected it to be {o}, but it was {i}{a}{f}",
]


def review_rows(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """n review-like sentences from templates, alternating positive and negative (tests.helpers style,
    with more variety: some sentences also name the opposite quality, so the task is not trivial)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = "positive" if i % 2 == 0 else "negative"
        same, opposite = (_POSITIVE, _NEGATIVE) if label == "positive" else (_NEGATIVE, _POSITIVE)
        subject, subject2 = rng.sample(_SUBJECTS, 2)
        text = rng.choice(_TEMPLATES).format(
            S=subject[0].upper() + subject[1:],
            s=subject,
            s2=subject2,
            i=rng.choice(_INTENSIFIERS),
            a=rng.choice(same),
            a2=rng.choice(same),
            o=rng.choice(opposite),
            n=rng.choice(_NOUNS),
            f=rng.choice(_FILLERS),
        )
        rows.append((text, label))
    return rows


# ---------------------------------------------------------------- the hand-written training loop


@dataclass(frozen=True)
class LoopHyperparameters:
    epochs: int
    batch_size: int
    learning_rate: float
    weight_decay: float = 0.01
    warmup_ratio: float = 0.06
    max_grad_norm: float = 1.0
    validation_split: float = 0.1

    def as_job(self) -> dict[str, float | int]:
        """The same values as a job's hyperparameters."""
        return {
            "epochs": self.epochs,
            "batch_size": self.batch_size,
            "learning_rate": self.learning_rate,
            "weight_decay": self.weight_decay,
            "warmup_ratio": self.warmup_ratio,
            "max_grad_norm": self.max_grad_norm,
            "validation_split": self.validation_split,
        }


@dataclass(frozen=True)
class Epoch:
    seconds: float  # train steps + the validation pass
    train_loss: float
    val_loss: float
    val_accuracy: float


def warmup_cosine(total_steps: int, warmup_ratio: float) -> Callable[[int], float]:
    """Linear warm-up over the first share of steps, then cosine decay to 0 (a LambdaLR factor)."""
    warmup = max(1, int(total_steps * warmup_ratio)) if warmup_ratio > 0 else 0

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def hand_train(
    model: nn.Module,
    logits: Callable[[list[int], bool], Tensor],
    train_labels: Tensor,
    val_labels: Tensor,
    hp: LoopHyperparameters,
    generator: torch.Generator,
    after_train_mode: Callable[[], object] | None = None,
    val_batch_size: int = 64,
) -> list[Epoch]:
    """A plain PyTorch loop: each epoch, AdamW over shuffled batches (warm-up + cosine schedule, gradient
    clipping), then a validation pass in eval mode. `logits(indices, train)` gives a batch's logits
    (indices into the training or validation examples)."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=hp.learning_rate, weight_decay=hp.weight_decay)
    n_train, n_val = len(train_labels), len(val_labels)
    total_steps = math.ceil(n_train / hp.batch_size) * hp.epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(total_steps, hp.warmup_ratio))
    history = []
    for _ in range(hp.epochs):
        started = time.perf_counter()
        model.train()
        if after_train_mode is not None:
            after_train_mode()
        loss_sum = 0.0
        order = torch.randperm(n_train, generator=generator).tolist()
        for start in range(0, n_train, hp.batch_size):
            indices = order[start : start + hp.batch_size]
            loss = F.cross_entropy(logits(indices, True), train_labels[indices])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(params, hp.max_grad_norm)
            optimizer.step()
            scheduler.step()
            loss_sum += float(loss.detach()) * len(indices)
        model.eval()
        with torch.no_grad():
            val_logits = torch.cat(
                [
                    logits(list(range(start, min(start + val_batch_size, n_val))), False)
                    for start in range(0, n_val, val_batch_size)
                ]
            )
        val_loss = float(F.cross_entropy(val_logits, val_labels))
        val_accuracy = float((val_logits.argmax(dim=1) == val_labels).float().mean())
        history.append(Epoch(time.perf_counter() - started, loss_sum / n_train, val_loss, val_accuracy))
    return history


def best_val_accuracy(epochs: Sequence[tuple[float, float]]) -> float:
    """The validation accuracy of the best epoch as Graft picks it: highest accuracy, then lowest loss.
    `epochs` holds (val_accuracy, val_loss) pairs."""
    return max(epochs, key=lambda pair: (pair[0], -pair[1]))[0]
