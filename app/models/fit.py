"""The one check that a model can read a dataset, shared by jobs (every dataset a job names), evaluation and
transferability: labels where they are needed, the same modality, the classes the model knows (where it
must know them all), and every column it was trained on."""

from __future__ import annotations

from collections.abc import Sequence

from app.core.errors import Unprocessable
from graft.catalog import TASK_MODALITY
from graft.tables import Dataset


def check_fits(
    dataset: Dataset,
    model: str,
    modality: str,
    feature_columns: Sequence[str],
    *,
    param: str,
    mismatch_param: str | None = None,
    labels_param: str | None = None,
    labels_for: str | None = None,
    classes: Sequence[str] | None = None,
) -> None:
    """Raise a 422 naming what does not fit. `param`: the request field that named the dataset;
    `mismatch_param`, `labels_param`: the ones a modality mismatch and missing labels are blamed on (default
    `param`); `labels_for`: what needs
    the dataset's labels, said in the message (None: an unlabelled dataset will do); `classes`: the
    model's, when each of the dataset's classes must be among them."""
    if labels_for is not None and not dataset.labeled:
        raise Unprocessable(
            f"dataset {dataset.id} has no labels; {labels_for}",
            param=labels_param or param,
            code="dataset_unlabeled",
        )
    if TASK_MODALITY[dataset.task] != modality:
        raise Unprocessable(
            f"{model} is a {modality} model and dataset {dataset.id} is {dataset.task}",
            param=mismatch_param or param,
            code="modality_mismatch",
        )
    if classes is not None:
        unknown = sorted(set(dataset.classes or ()) - set(classes))
        if unknown:
            raise Unprocessable(
                f"dataset {dataset.id} has classes the model cannot predict: {', '.join(unknown[:5])}",
                param=param,
                code="classes_mismatch",
            )
    have = set(dataset.schema_info.get("feature_columns", []))
    missing = [c for c in feature_columns if c not in have]
    if missing:
        raise Unprocessable(
            f"dataset {dataset.id} lacks the column '{missing[0]}' that {model} reads",
            param=param,
            code="columns_mismatch",
        )
