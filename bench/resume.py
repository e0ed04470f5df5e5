"""Benchmark: what durable jobs cost. The same training run with the training state journalled at every
epoch (as every worker does: weights, best weights, optimiser moments, RNG, written to a safetensors file
and fsynced) against the run without a journal, in the same process, alternating; and the time to resume
(load the state and restore it after setup).

Two models: an mlp on the digits table (state of a few hundred KB) and minilm-l6 fine-tuned in full
(22.7M parameters: the biggest state of the built-ins), each for a few epochs on small data.

    .venv/bin/python -m bench.resume [--runs 3]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import command_line, markdown_table, median, report, review_rows, runs_list, timed
from graft.defaults import default_hyperparameters
from graft.sources import BaseModelSource, DatasetSource
from graft.spec import ModelSpec
from ml.resume import TrainingState, load_state, save_state
from tests.helpers import digits_table_csv, text_csv, write
from tests.unit.test_finetune_recipe import ListReporter, source
from workers.recipes.finetune import FinetuneConfig, FinetuneRecipe

NAME = "resume"


class TimedJournal:
    """Saves every state to a file as the worker does (atomic write and fsync), timing each save."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.saves: list[float] = []
        self.bytes = 0
        self.last: Path | None = None

    def load(self) -> TrainingState | None:
        return load_state(self.last) if self.last is not None else None

    def save(self, state: TrainingState) -> None:
        started = time.perf_counter()
        temp = self.folder / f"state-{len(self.saves)}.part"
        save_state(temp, state)
        fd = os.open(temp, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
        target = temp.with_suffix(".safetensors")
        os.replace(temp, target)
        if self.last is not None and self.last != target:
            self.last.unlink()
        self.last = target
        self.bytes = target.stat().st_size
        self.saves.append(time.perf_counter() - started)


class Reporter(ListReporter):
    def __init__(self, journal: TimedJournal | None) -> None:
        super().__init__()
        if journal is not None:
            self.journal = journal


def config(architecture: str, train: DatasetSource, epochs: int) -> FinetuneConfig:
    pretrained = architecture == "minilm-l6"
    base = BaseModelSource(id=architecture, spec=ModelSpec.for_builtin(architecture), pretrained=pretrained)
    hp = {**default_hyperparameters(architecture, "full"), "epochs": epochs, "early_stopping": None}
    return FinetuneConfig(job_id="bench", method="full", base=base, train=train, hyperparameters=hp, seed=1)  # type: ignore[arg-type]


def measure(architecture: str, train: DatasetSource, epochs: int, runs: int, scratch: Path) -> dict[str, Any]:
    plain: list[float] = []
    journalled: list[float] = []
    saves: list[float] = []
    size = 0
    resume: list[float] = []
    for run in range(runs):
        wall, _ = timed(lambda: FinetuneRecipe(config(architecture, train, epochs), Reporter(None)).run())
        plain.append(wall)
        folder = scratch / f"{architecture}-{run}"
        folder.mkdir()
        journal = TimedJournal(folder)
        journalled_recipe = FinetuneRecipe(config(architecture, train, epochs), Reporter(journal))
        wall, _ = timed(journalled_recipe.run)
        journalled.append(wall)
        saves.append(median(journal.saves))
        size = journal.bytes
        # Resuming: loading the last state and restoring it after setup (the setup itself is not counted).
        recipe = FinetuneRecipe(config(architecture, train, epochs), Reporter(None))
        recipe.setup()
        started = time.perf_counter()
        state = journal.load()
        assert state is not None
        recipe.restore(state)
        resume.append(time.perf_counter() - started)
        print(
            f"{architecture} run {run + 1}: plain {plain[-1]:.2f} s, journalled {journalled[-1]:.2f} s",
            flush=True,
        )
    return {
        "plain": plain,
        "journalled": journalled,
        "save": median(saves),
        "bytes": size,
        "resume": median(resume),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="graft-bench-") as temp:
        scratch = Path(temp)
        digits = source(
            write(scratch / "digits.csv", digits_table_csv(range(10), 1000)),
            "tabular_classification",
            label_column="digit",
        )
        reviews = source(
            write(scratch / "reviews.csv", text_csv(review_rows(240, seed=2))), "text_classification"
        )
        for architecture, train, epochs, data in (
            ("mlp", digits, 10, "1000 digit rows"),
            ("minilm-l6", reviews, 3, "240 review sentences"),
        ):
            found = measure(architecture, train, epochs, args.runs, scratch)
            overhead = median(found["journalled"]) / median(found["plain"])
            rows.append(
                [
                    f"{architecture} full, {data}, {epochs} epochs",
                    runs_list(found["plain"], " s"),
                    runs_list(found["journalled"], " s"),
                    f"{overhead:.3f}",
                    f"{found['bytes'] / 1e6:.2f} MB",
                    f"{found['save']:.3f} s",
                    f"{found['resume']:.3f} s",
                ]
            )
    table = markdown_table(
        [
            "run",
            "without journal (runs)",
            "with journal (runs)",
            "ratio of medians",
            "state file",
            "one save (median)",
            "resume: load + restore",
        ],
        rows,
    )
    body = (
        f"{table}\n\nEach run trains the same model from the same seed; the journal writes the whole training "
        "state at every epoch's end (fsynced, renamed into place). Wall times include setup (model, data)."
    )
    report(NAME, "Durable jobs: the cost of journalling training state", command_line("bench.resume"), body)


if __name__ == "__main__":
    main()
