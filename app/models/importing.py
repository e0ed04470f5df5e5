"""Importing weights trained elsewhere: a safetensors file and a config naming a built-in architecture and
its classes. Every tensor is checked against the architecture before anything is stored; nothing is
ever unpickled."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from sqlalchemy.orm import Session

from app.core.db import after_rollback
from app.core.errors import Unprocessable
from app.core.ids import new_id, utcnow
from app.core.security import Principal
from app.core.storage import Storage, sha256_file
from app.core.text import unsafe_character
from app.datasets.upload import ReceivedUpload
from app.models import repository
from app.models.schemas import ImportConfig
from app.tables import Model
from workers.backbones.spec import SPEC_METADATA_KEY, ModelSpec

FLOAT_DTYPES = {"F16", "BF16", "F32", "F64"}
INT_DTYPES = {"I8", "I16", "I32", "I64", "U8"}


def spec_from_config(config: ImportConfig) -> ModelSpec:
    if len(set(config.classes)) != len(config.classes):
        raise Unprocessable("classes must be distinct", param="config.classes", code="invalid_request")
    if len(config.classes) == 1:
        raise Unprocessable(
            "a classifier needs at least two classes (or none, for a bare backbone)",
            param="config.classes",
            code="invalid_request",
        )
    spec = ModelSpec.for_builtin(config.architecture).with_classes(config.classes)
    if config.architecture == "mlp":
        if not config.feature_columns:
            raise Unprocessable(
                "an mlp needs its feature_columns", param="config.feature_columns", code="invalid_request"
            )
        hidden = config.hidden or [128, 128]
        if any(not 1 <= size <= 4096 for size in hidden):
            raise Unprocessable(
                "hidden layer sizes are between 1 and 4096", param="config.hidden", code="invalid_request"
            )
        spec = spec.model_copy(
            update={
                "options": {"in_features": len(config.feature_columns), "hidden": hidden},
                "input_spec": {**spec.input_spec, "feature_columns": list(config.feature_columns)},
            }
        )
    elif config.feature_columns is not None or config.hidden is not None:
        raise Unprocessable("feature_columns and hidden apply to mlp", param="config", code="invalid_request")
    if config.max_length is not None:
        if config.architecture != "minilm-l6":
            raise Unprocessable(
                "max_length applies to minilm-l6", param="config.max_length", code="invalid_request"
            )
        spec = spec.model_copy(update={"input_spec": {**spec.input_spec, "max_length": config.max_length}})
    return spec


def _read_header(path: Path) -> tuple[dict[str, tuple[list[int], str]], dict[str, str]]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            header = {
                name: (list(handle.get_slice(name).get_shape()), handle.get_slice(name).get_dtype())
                for name in handle.keys()  # noqa: SIM118  (a safetensors handle, not a dict)
            }
            return header, dict(handle.metadata() or {})
    except Exception as exc:
        raise Unprocessable(f"weights: not a safetensors file ({exc})"[:500], param="weights") from None


def check_tensors(
    expected: dict[str, Any], header: dict[str, tuple[list[int], str]], spec: ModelSpec
) -> None:
    """422 naming the first tensor that does not fit the architecture."""
    what = f"{spec.architecture}" + (
        f" with {len(spec.classes)} classes" if spec.classes else " without a head"
    )
    for name, tensor in expected.items():
        if name not in header:
            raise Unprocessable(
                f"weights: tensor '{name}' is missing ({what} has it)",
                param="weights",
                code="tensor_mismatch",
            )
        shape, dtype = header[name]
        if shape != list(tensor.shape):
            raise Unprocessable(
                f"weights: tensor '{name}' has shape {shape}; {what} expects {list(tensor.shape)}",
                param="weights",
                code="tensor_mismatch",
            )
        wanted = FLOAT_DTYPES if tensor.is_floating_point() else INT_DTYPES
        if dtype not in wanted:
            raise Unprocessable(
                f"weights: tensor '{name}' has dtype {dtype}", param="weights", code="tensor_mismatch"
            )
    extra = sorted(set(header) - set(expected))
    if extra:
        raise Unprocessable(
            f"weights: unexpected tensor '{extra[0]}' for {what}", param="weights", code="tensor_mismatch"
        )


def import_model(session: Session, storage: Storage, principal: Principal, upload: ReceivedUpload) -> Model:
    from safetensors.torch import load_file

    from workers.backbones.networks import build_model, count_parameters
    from workers.backbones.weights import save_weights

    try:
        unknown = sorted(set(upload.fields) - {"config"})
        if unknown:
            raise Unprocessable(
                f"unknown form field '{unknown[0]}' (expected: weights, config)",
                param=unknown[0],
                code="invalid_request",
            )
        if upload.path is None or upload.size == 0:
            raise Unprocessable(
                "a non-empty 'weights' part (safetensors) is required",
                param="weights",
                code="invalid_request",
            )
        header, metadata = _read_header(upload.path)
        raw_config = upload.fields.get("config")
        if raw_config is not None:
            if unsafe_character(raw_config):
                raise Unprocessable(
                    "config contains a character that cannot be stored",
                    param="config",
                    code="invalid_request",
                )
            try:
                config = ImportConfig.model_validate(json.loads(raw_config))
            except (ValueError, RecursionError) as exc:
                detail = exc.errors()[0] if isinstance(exc, ValidationError) else None
                where = ".".join(str(p) for p in detail["loc"]) if detail else ""
                message = f"{where}: {detail['msg']}" if detail else f"not valid JSON ({type(exc).__name__})"
                param = f"config.{where}" if where else "config"
                raise Unprocessable(f"config: {message}", param=param, code="invalid_request") from None
            spec, name = spec_from_config(config), config.name
        elif SPEC_METADATA_KEY in metadata:
            # A file exported by Graft carries its own config.
            spec, name = ModelSpec.from_metadata(metadata[SPEC_METADATA_KEY]), None
        else:
            raise Unprocessable(
                "a 'config' part (JSON naming the architecture and classes) is required",
                param="config",
                code="invalid_request",
            )
        model = build_model(spec, pretrained=False)
        expected = model.state_dict()
        check_tensors(expected, header, spec)
        tensors = load_file(str(upload.path))
        model.load_state_dict({k: v.to(expected[k].dtype) for k, v in tensors.items()}, strict=True)
        model_id = new_id("mdl")
        key = f"models/{model_id}/model.safetensors"
        with storage.atomic_path(key) as temp:
            save_weights(temp, model.state_dict(), spec, extra={"imported_sha256": upload.sha256})
            size, digest = temp.stat().st_size, sha256_file(temp)
        after_rollback(session, lambda: storage.delete_tree(f"models/{model_id}"))
    finally:
        upload.discard()
    row = Model(
        id=model_id,
        project_id=principal.project_id,
        name=name or f"{spec.architecture} imported",
        kind="imported",
        architecture=spec.architecture,
        modality=spec.modality,
        classes=list(spec.classes),
        metrics={},
        spec=spec.model_dump(),
        num_parameters=count_parameters(model),
        job_id=None,
        base_model=None,
        training_dataset=None,
        weights_path=key,
        weights_bytes=size,
        weights_sha256=digest,
        created_at=utcnow(),
    )
    repository.add(session, row)
    return row
