"""Resuming a run from its saved training state: stopped mid-epoch (a worker shutting down) or at an epoch's
end (a worker killed), the resumed run ends with exactly the weights and history of an uninterrupted one
(on the CPU, where training is deterministic)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from graft.defaults import default_hyperparameters
from graft.sources import BaseModelSource, DatasetSource
from graft.spec import ModelSpec
from ml.resume import TrainingState, load_state, save_state
from ml.runtime import JobPreempted
from tests.helpers import iris_csv, shifted_table_csv, write
from tests.unit.test_finetune_recipe import ListReporter, source
from workers.recipes.adapt import AdaptConfig, AdaptRecipe
from workers.recipes.finetune import FinetuneConfig, FinetuneRecipe, FinetuneResult


class FileJournal:
    """A journal that keeps every saved state as a real file (what the worker's does, minus the database)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.saved: list[Path] = []

    def load(self) -> TrainingState | None:
        return load_state(self.saved[-1]) if self.saved else None

    def save(self, state: TrainingState) -> None:
        path = self.folder / f"state-{len(self.saved)}.safetensors"
        save_state(path, state)
        self.saved.append(path)


class JournalReporter(ListReporter):
    """Asks the run to stop for a worker shutdown after `release_after_steps` steps."""

    def __init__(self, journal: FileJournal, release_after_steps: int | None = None) -> None:
        super().__init__()
        self.journal = journal
        self.release_after_steps = release_after_steps
        self.stop_reason: str | None = None

    def should_stop(self) -> bool:
        if self.release_after_steps is not None and len(self.progress_seen) > self.release_after_steps:
            self.stop_reason = "release"
            return True
        return False


@pytest.fixture(scope="module")
def iris(tmp_path_factory: pytest.TempPathFactory) -> DatasetSource:
    path = write(tmp_path_factory.mktemp("iris") / "iris.csv", iris_csv())
    return source(path, "tabular_classification", label_column="species")


def mlp_config(train: DatasetSource, **hp: Any) -> FinetuneConfig:
    base = BaseModelSource(id="mlp", spec=ModelSpec.for_builtin("mlp"), pretrained=False)
    hyperparameters = {**default_hyperparameters("mlp", "full"), "epochs": 6, "batch_size": 16, **hp}
    return FinetuneConfig(
        job_id="job_resume",
        method="full",
        base=base,
        train=train,
        hyperparameters=hyperparameters,  # type: ignore[arg-type]
        seed=11,
    )


def same_result(a: FinetuneResult, b: FinetuneResult) -> None:
    assert a.state.keys() == b.state.keys()
    for key in a.state:
        assert torch.equal(a.state[key], b.state[key]), key
    strip = [{k: v for k, v in h.items() if k != "epoch_seconds"} for h in a.history]
    assert strip == [{k: v for k, v in h.items() if k != "epoch_seconds"} for h in b.history]
    assert a.best_epoch == b.best_epoch and a.metrics == b.metrics


def test_a_run_stopped_mid_epoch_resumes_to_the_uninterrupted_result(
    iris: DatasetSource, tmp_path: Path
) -> None:
    config = mlp_config(iris)
    uninterrupted = FinetuneRecipe(config, JournalReporter(FileJournal(tmp_path / "a"))).run()

    journal = FileJournal(tmp_path / "b")
    first = JournalReporter(journal, release_after_steps=20)  # 8 steps an epoch: stops in epoch 3
    with pytest.raises(JobPreempted):
        FinetuneRecipe(config, first).run()
    saved = journal.load()
    assert saved is not None and saved.epoch == 3 and 0 < saved.batch < 8
    assert [m["epoch"] for m in first.metrics_seen] == [1.0, 2.0]

    second = JournalReporter(journal)
    resumed = FinetuneRecipe(config, second).run()
    same_result(resumed, uninterrupted)
    # The second attempt reports only what the first did not: epochs 3 to 6, one resume message.
    assert [m["epoch"] for m in second.metrics_seen] == [3.0, 4.0, 5.0, 6.0]
    assert sum("Resumed from the training state saved in epoch 3" in e for e in second.events) == 1
    assert not any(e.startswith("Loaded mlp") for e in second.events)


def test_a_killed_run_resumes_from_its_last_epoch(iris: DatasetSource, tmp_path: Path) -> None:
    """A worker killed mid-epoch leaves the state of the last finished epoch; the next attempt redoes the
    interrupted epoch from there, with the data order and randomness it had."""
    config = mlp_config(iris, early_stopping={"metric": "val_loss", "patience": 50})
    uninterrupted = FinetuneRecipe(config, JournalReporter(FileJournal(tmp_path / "a"))).run()

    journal = FileJournal(tmp_path / "b")
    with pytest.raises(JobPreempted):
        FinetuneRecipe(config, JournalReporter(journal, release_after_steps=36)).run()
    # As if killed: the mid-epoch state never got written; the end of epoch 4 is the last state.
    journal.saved.pop()
    last = journal.load()
    assert last is not None and last.epoch == 4 and last.batch == 0
    resumed = FinetuneRecipe(config, JournalReporter(journal)).run()
    same_result(resumed, uninterrupted)


def test_a_finished_run_is_not_trained_again(iris: DatasetSource, tmp_path: Path) -> None:
    journal = FileJournal(tmp_path / "a")
    config = mlp_config(iris, epochs=3)
    first = FinetuneRecipe(config, JournalReporter(journal)).run()
    assert load_state(journal.saved[-1]).complete
    again = JournalReporter(journal)
    second = FinetuneRecipe(config, again).run()
    same_result(second, first)
    assert again.metrics_seen == [] and again.progress_seen == []


def test_domain_adaptation_resumes_with_its_discriminator_and_target_order(tmp_path: Path) -> None:
    source_path = write(tmp_path / "source.csv", shifted_table_csv(120, domain="source", seed=1))
    target_path = write(tmp_path / "target.csv", shifted_table_csv(120, domain="target", seed=2))
    train = source(source_path, "tabular_classification", label_column="label")
    target = source(target_path, "tabular_classification", label_column="label")
    base = BaseModelSource(id="mlp", spec=ModelSpec.for_builtin("mlp"), pretrained=False)
    config = AdaptConfig(
        job_id="job_resume",
        method="full",
        base=base,
        train=train,
        target=target,
        hyperparameters={**default_hyperparameters("mlp", "full"), "epochs": 4, "batch_size": 16},  # type: ignore[arg-type]
        adaptation="dann",
        keep_last_epoch=True,
        seed=5,
    )
    uninterrupted = AdaptRecipe(config, JournalReporter(FileJournal(tmp_path / "a"))).run()
    journal = FileJournal(tmp_path / "b")
    with pytest.raises(JobPreempted):
        AdaptRecipe(config, JournalReporter(journal, release_after_steps=9)).run()
    saved = journal.load()
    assert saved is not None and saved.batch > 0 and saved.group("extras")
    resumed = AdaptRecipe(config, JournalReporter(journal)).run()
    same_result(resumed, uninterrupted)


def test_the_state_file_holds_no_pickle(iris: DatasetSource, tmp_path: Path) -> None:
    journal = FileJournal(tmp_path)
    FinetuneRecipe(mlp_config(iris, epochs=1), JournalReporter(journal)).run()
    raw = journal.saved[-1].read_bytes()
    header_size = int.from_bytes(raw[:8], "little")
    assert raw[8 : 8 + header_size].startswith(b"{")  # a safetensors JSON header, then raw tensor bytes
    assert b"\x80\x04\x95" not in raw  # no pickle protocol-4 frame anywhere


def test_self_supervised_pretraining_resumes_from_its_last_epoch(iris: DatasetSource, tmp_path: Path) -> None:
    from graft.jobspec import Hyperparameters
    from workers.recipes.self_supervised import SelfSupervisedConfig, SelfSupervisedRecipe

    def recipe(reporter: JournalReporter) -> SelfSupervisedRecipe:
        base = BaseModelSource(id="mlp", spec=ModelSpec.for_builtin("mlp"), pretrained=False)
        hp = {**default_hyperparameters("mlp", "self_supervised"), "epochs": 5, "batch_size": 16}
        config = SelfSupervisedConfig(
            job_id="job_resume", seed=4, base=base, train=iris, hyperparameters=Hyperparameters(**hp)
        )
        return SelfSupervisedRecipe(config, reporter)

    uninterrupted = recipe(JournalReporter(FileJournal(tmp_path / "a"))).run()
    journal = FileJournal(tmp_path / "b")
    with pytest.raises(JobPreempted):
        recipe(JournalReporter(journal, release_after_steps=20)).run()  # 9 steps an epoch: in epoch 3
    assert journal.load() is not None and journal.load().epoch == 2  # type: ignore[union-attr]
    again = JournalReporter(journal)
    resumed = recipe(again).run()
    assert [m["epoch"] for m in again.metrics_seen] == [3.0, 4.0, 5.0]
    for key in uninterrupted.state:
        assert torch.equal(resumed.state[key], uninterrupted.state[key]), key
