"""One error hierarchy: what a failed run records comes from the exception's type, the same types the API
renders; nothing is matched by a type's name."""

from __future__ import annotations

import errno

import pytest
import torch

from app.core.errors import NotFound, Unprocessable
from graft.errors import GraftError, InvalidData
from graft.formats import FormatError
from ml.preprocess import InputError
from ml.runtime import as_error


@pytest.mark.parametrize(
    ("raised", "code", "words"),
    [
        (FormatError("row 3: no label", param="file"), "invalid_data", "row 3: no label"),
        (InputError("inputs[2]: 3 columns, the model reads 4", index=2), "invalid_input", "inputs[2]"),
        (OSError(errno.ENOSPC, "No space left on device"), "storage_full", "storage volume is full"),
        (FileNotFoundError("datasets/ds_x/data.csv"), "missing_input", "datasets/ds_x/data.csv"),
        (torch.OutOfMemoryError("CUDA out of memory"), "out_of_memory", "ran out of memory"),
        (RuntimeError("shapes do not match"), "training_error", "RuntimeError: shapes do not match"),
    ],
)
def test_a_failed_run_records_the_code_of_its_error_type(
    raised: BaseException, code: str, words: str
) -> None:
    error = as_error(raised)
    assert isinstance(error, GraftError)
    assert error.code == code
    assert words in error.message


def test_a_type_named_like_another_is_not_taken_for_it() -> None:
    class OutOfMemoryError(Exception):  # the old mapping went by this name
        pass

    assert as_error(OutOfMemoryError("not the device's")).code == "training_error"


def test_the_api_and_the_workers_share_the_hierarchy() -> None:
    assert issubclass(Unprocessable, InvalidData) and issubclass(NotFound, GraftError)
    assert issubclass(FormatError, InvalidData) and issubclass(FormatError, ValueError)
    assert issubclass(InputError, InvalidData) and issubclass(InputError, ValueError)
    assert FormatError("x", param="rows").param == "rows"
    assert (Unprocessable.status_code, InvalidData.status_code) == (422, 422)
