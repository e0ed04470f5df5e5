from __future__ import annotations

import json
from typing import Any

from fastapi import APIRouter, Request, Response, status
from fastapi.responses import FileResponse
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from app.core.deps import ContextDep, PrincipalDep, SessionDep
from app.core.errors import (
    ERROR_RESPONSES,
    InvalidRequest,
    NotFound,
    Unprocessable,
    UnsupportedMediaType,
)
from app.core.pagination import AfterQuery, LimitQuery, ListResponse
from app.datasets.upload import receive_multipart
from app.jobs.schemas import JobOut
from app.models import evaluation, importing, service
from app.models.schemas import (
    EvaluateRequest,
    Evaluation,
    ModelOut,
    PredictResponse,
    TextOrTabularPredictRequest,
)
from workers.backbones.catalog import BUILTIN_MODELS

router = APIRouter(prefix="/v1/models", tags=["models"], responses=ERROR_RESPONSES)

PREDICT_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {"$ref": "#/components/schemas/TextOrTabularPredictRequest"},
                "examples": {
                    "text": {"value": {"inputs": ["a wonderful film", "a waste of two hours"]}},
                    "tabular": {"value": {"inputs": [{"petal_length": 1.4, "petal_width": 0.2}]}},
                },
            },
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["files"],
                    "properties": {
                        "files": {
                            "type": "array",
                            "items": {"type": "string", "format": "binary"},
                            "description": "PNG or JPEG images, any size and colour mode (image models).",
                        }
                    },
                }
            },
        },
    }
}


@router.get(
    "",
    response_model=ListResponse[ModelOut],
    summary="List models: built-in upstream models, then the project's",
)
def list_models(
    session: SessionDep, principal: PrincipalDep, limit: LimitQuery = 20, after: AfterQuery = None
) -> dict[str, object]:
    data, has_more = service.list_models(session, principal, after=after, limit=limit)
    return {"data": data, "has_more": has_more}


@router.get("/{model_id}", response_model=ModelOut, summary="Get a model")
def get_model(model_id: str, session: SessionDep, principal: PrincipalDep) -> dict[str, Any]:
    return service.view(session, principal, model_id)


IMPORT_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["weights"],
                    "properties": {
                        "weights": {
                            "type": "string",
                            "format": "binary",
                            "description": "A safetensors file.",
                        },
                        "config": {
                            "type": "string",
                            "description": 'JSON: {"architecture", "classes", "name"?, "feature_columns"? '
                            '(mlp), "hidden"? (mlp), "max_length"? (minilm-l6)}. May be left out for a file '
                            "exported by Graft, which carries its config.",
                            "example": '{"architecture": "cnn-small", "classes": ["cat", "dog"]}',
                        },
                    },
                }
            }
        },
    }
}


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=ModelOut,
    summary="Import a model: safetensors weights and a config naming a built-in architecture",
    description=(
        "Every tensor is checked against the architecture (a 422 names the first missing, unexpected or "
        "mis-shaped one) before anything is stored. Nothing is unpickled. The model can then be a job's "
        "base_model, be evaluated, or serve predictions."
    ),
    openapi_extra=IMPORT_BODY,
)
async def import_model(
    request: Request, context: ContextDep, session: SessionDep, principal: PrincipalDep
) -> dict[str, Any]:
    upload = await receive_multipart(
        request, context.storage, max_bytes=context.settings.max_upload_bytes, file_field="weights"
    )
    row = await run_in_threadpool(importing.import_model, session, context.storage, principal, upload)
    return service.registered_view(row)


def _model_file(
    context: ContextDep, session: SessionDep, principal: PrincipalDep, model_id: str, adapter: bool
) -> FileResponse:
    if model_id in BUILTIN_MODELS:
        raise InvalidRequest(
            f"{model_id}'s weights come with its Python package; fine-tune it to get weights of your own",
            param="model",
            code="builtin_weights",
        )
    row = service.get_registered(session, principal, model_id)
    path = row.adapter_path if adapter else row.weights_path
    if path is None:
        raise NotFound(f"{row.id} has no adapter (only LoRA jobs make one)", code="adapter_not_found")
    name = f"{row.id}-adapter.safetensors" if adapter else f"{row.id}.safetensors"
    return FileResponse(context.storage.path(path), media_type="application/octet-stream", filename=name)


@router.get(
    "/{model_id}/content",
    summary="Download a model's weights (safetensors, config in the metadata)",
    description=(
        "Every tensor of the model (a LoRA model's adapter merged in), with its config (`graft_spec` in the "
        "safetensors metadata, also the model object's `config`). The README shows how to load it without Graft."
    ),
    response_class=FileResponse,
    responses={200: {"content": {"application/octet-stream": {}}, "description": "A safetensors file"}},
)
def get_model_content(
    model_id: str, context: ContextDep, session: SessionDep, principal: PrincipalDep
) -> FileResponse:
    return _model_file(context, session, principal, model_id, adapter=False)


@router.get(
    "/{model_id}/adapter",
    summary="Download a LoRA model's adapter on its own (safetensors)",
    description="peft's tensor names; the LoRA config (`graft_lora`) and the head are in the same file.",
    response_class=FileResponse,
    responses={200: {"content": {"application/octet-stream": {}}, "description": "A safetensors file"}},
)
def get_model_adapter(
    model_id: str, context: ContextDep, session: SessionDep, principal: PrincipalDep
) -> FileResponse:
    return _model_file(context, session, principal, model_id, adapter=True)


@router.post(
    "/{model_id}/evaluate",
    response_model=Evaluation | JobOut,
    summary="Evaluate a model on a labelled dataset",
    description=(
        "Accuracy, macro-F1, per-class precision/recall/F1 and the confusion matrix, classes matched by name. "
        "Datasets up to `GRAFT_EVALUATE_SYNC_MAX_EXAMPLES` examples are answered directly (200); larger ones "
        "get an evaluation job (202, `object: job`) whose `metrics` hold the same once it succeeded."
    ),
    responses={202: {"model": JobOut, "description": "Queued as an evaluation job"}},
)
def evaluate_model(
    model_id: str,
    body: EvaluateRequest,
    response: Response,
    context: ContextDep,
    session: SessionDep,
    principal: PrincipalDep,
) -> Any:
    result, answered = evaluation.evaluate(session, context, principal, model_id, body.dataset)
    if not answered:
        response.status_code = status.HTTP_202_ACCEPTED
        return JobOut.model_validate(result)
    return result


async def _json_inputs(request: Request) -> list[Any]:
    try:
        payload = json.loads(await request.body())
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, bad UTF-8, overlong numbers, deep nesting
        raise InvalidRequest(f"the body is not valid JSON ({type(exc).__name__})") from None
    try:
        body = TextOrTabularPredictRequest.model_validate(payload)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = ".".join(str(p) for p in first["loc"]) or "inputs"
        raise Unprocessable(f"{param}: {first['msg']}", param=param, code="invalid_request") from None
    return list(body.inputs)


async def _image_inputs(request: Request, max_files: int) -> list[tuple[str, bytes]]:
    form = await request.form(max_files=max_files + 1, max_fields=8)
    try:
        files = [item for item in form.getlist("files") if isinstance(item, UploadFile)]
        if not files:
            raise Unprocessable(
                "send the images as multipart 'files' parts", param="files", code="invalid_request"
            )
        if len(files) > max_files:
            raise Unprocessable(
                f"at most {max_files} files per request", param="files", code="invalid_request"
            )
        return [(item.filename or f"files[{i}]", await item.read()) for i, item in enumerate(files)]
    finally:
        await form.close()


@router.post(
    "/{model_id}/predict",
    response_model=PredictResponse,
    summary="Predict with a model",
    description=(
        'Text models take JSON `{"inputs": ["..."]}`; tabular models JSON `{"inputs": [{column: number}]}`; '
        "image models multipart `files` (PNG/JPEG of any size and colour mode, converted exactly as in training)."
    ),
    openapi_extra=PREDICT_BODY,
)
async def predict(
    model_id: str, request: Request, context: ContextDep, session: SessionDep, principal: PrincipalDep
) -> dict[str, Any]:
    if model_id in BUILTIN_MODELS:
        raise InvalidRequest(
            f"{model_id} is an upstream model without a classification head; fine-tune it, then predict with "
            "the job's result_model",
            param="model",
            code="model_not_servable",
        )
    row = service.get_registered(session, principal, model_id)
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    limit = context.settings.max_predict_inputs
    inputs: list[Any]
    if row.modality == "image":
        if content_type != "multipart/form-data":
            raise UnsupportedMediaType(
                "image models take multipart/form-data with 'files' parts", param="files"
            )
        inputs = await _image_inputs(request, limit)
    else:
        if content_type != "application/json":
            raise UnsupportedMediaType(
                f'{row.modality} models take application/json {{"inputs": [...]}}', param="inputs"
            )
        inputs = await _json_inputs(request)
        if len(inputs) > limit:
            raise Unprocessable(f"at most {limit} inputs per request", param="inputs", code="invalid_request")
    predictions = await run_in_threadpool(context.model_server.predict, row, inputs)
    return {"model": row.id, "predictions": predictions}
