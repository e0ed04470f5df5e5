"""One error hierarchy for the API and the workers. A `GraftError` carries its machine-readable `code`, an
HTTP `status_code`, a message for people and the `param` it is about; the API renders any of them as
`{"error": {"code", "message", "param"}}` (app/core/errors.py), and a job that fails with one records the
same code and message as its `error`. The HTTP-only kinds (unauthorised, rate limited...) subclass it in
app/core/errors.py; what both sides raise lives here, without a web framework."""

from __future__ import annotations


class GraftError(Exception):
    status_code = 400
    code = "invalid_request"

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        self.headers = headers


class InvalidData(GraftError):
    """Data that cannot be used as it is: a malformed file, a row or an input the model cannot take."""

    status_code = 422
    code = "invalid_data"


class MissingInput(GraftError):
    """A stored file (a dataset's, a model's weights, a checkpoint) is no longer in storage: removed from
    the volume by hand, or lost in a restore. A job that needs it fails with this code; a request gets a
    409 (the object exists, its file does not), and the operator finds the key in the log."""

    status_code = 409
    code = "missing_input"


class TrainingDiverged(GraftError):
    """A run's loss became NaN or infinite: nothing it would go on to learn means anything."""

    status_code = 422
    code = "training_diverged"


class NonFiniteOutput(InvalidData):
    """A model computed NaN or infinity (its weights or the inputs hold values it cannot compute with)."""

    code = "non_finite_output"


class StorageFull(GraftError):
    status_code = 507
    code = "storage_full"


class OutOfMemory(GraftError):
    status_code = 507
    code = "out_of_memory"
