from __future__ import annotations

import json
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response, status
from fastapi.responses import FileResponse
from pydantic import ValidationError
from python_multipart.multipart import parse_options_header
from sqlalchemy.orm import Session
from starlette.datastructures import UploadFile

from app.core.deps import ContextDep, PrincipalDep, ServiceContext
from app.core.errors import (
    ERROR_RESPONSES,
    GraftError,
    InvalidRequest,
    NotFound,
    Unprocessable,
    UnsupportedMediaType,
    param_from_loc,
)
from app.core.pagination import AfterQuery, LimitQuery, ListResponse
from app.core.security import Principal
from app.datasets.upload import MAX_BOUNDARY_CHARS, receive_multipart
from app.jobs.schemas import JobOut
from app.models import evaluation, importing, service
from app.models.schemas import (
    EvaluateRequest,
    Evaluation,
    ModelOut,
    PredictResponse,
    TextOrTabularPredictRequest,
)
from graft.catalog import BUILTIN_MODELS

router = APIRouter(prefix="/v1/models", tags=["models"], responses=ERROR_RESPONSES)

# A config part holds up to 1000 class names and 10,000 feature columns of 200 characters each.
IMPORT_CONFIG_BYTES = 4 * 1024 * 1024

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
async def list_models(
    context: ContextDep, principal: PrincipalDep, limit: LimitQuery = 20, after: AfterQuery = None
) -> Response:
    def page(session: Session) -> dict[str, object]:
        data, has_more = service.list_models(session, principal, after=after, limit=limit)
        return {"data": data, "has_more": has_more}

    return await context.read_json(ListResponse[ModelOut], page)


@router.get("/{model_id}", response_model=ModelOut, summary="Get a model")
async def get_model(model_id: str, context: ContextDep, principal: PrincipalDep) -> Response:
    return await context.read_json(ModelOut, service.view, principal, model_id)


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
                            '(mlp), "hidden"? (mlp), "max_length"? (minilm-l6), "layers"? (minilm-l6, 1-6), '
                            '"width"? (cnn-small)}. May be left out for a file exported by Graft, which carries '
                            "its config (checked with the same rules and limits: at most GRAFT_MAX_CLASSES "
                            "classes of GRAFT_MAX_CLASS_CHARS characters).",
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
async def import_model(request: Request, context: ContextDep, principal: PrincipalDep) -> dict[str, Any]:
    # The weights stream to a temporary file and are checked and rewritten with no unit of work open;
    # the model's row is written in a short one at the end.
    settings = context.settings
    upload = await receive_multipart(
        request,
        context.storage,
        max_bytes=settings.max_upload_bytes,
        file_field="weights",
        max_field_bytes=IMPORT_CONFIG_BYTES,
    )
    prepared = await context.compute(
        importing.prepare_import,
        context.storage,
        upload,
        max_classes=settings.max_classes,
        max_class_chars=settings.max_class_chars,
        max_column_chars=settings.max_column_chars,
        max_parameters=settings.max_import_parameters,
    )
    row = await context.db.write(importing.register_import, context.storage, principal, prepared)
    return service.registered_view(row)


async def _model_file(
    context: ServiceContext, principal: Principal, model_id: str, adapter: bool
) -> FileResponse:
    if model_id in BUILTIN_MODELS:
        raise InvalidRequest(
            f"{model_id}'s weights come with its Python package; fine-tune it to get weights of your own",
            param="model",
            code="builtin_weights",
        )
    row = await context.db.read(service.get_registered, principal, model_id)
    path = row.adapter_path if adapter else row.weights_path
    if path is None:
        raise NotFound(f"{row.id} has no adapter (only LoRA jobs make one)", code="adapter_not_found")
    name = f"{row.id}-adapter.safetensors" if adapter else f"{row.id}.safetensors"
    what = f"the {'adapter' if adapter else 'weights'} file of model {row.id}"
    return FileResponse(
        context.storage.existing(path, what), media_type="application/octet-stream", filename=name
    )


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
async def get_model_content(model_id: str, context: ContextDep, principal: PrincipalDep) -> FileResponse:
    return await _model_file(context, principal, model_id, adapter=False)


@router.get(
    "/{model_id}/adapter",
    summary="Download a LoRA model's adapter on its own (safetensors)",
    description="peft's tensor names; the LoRA config (`graft_lora`) and the head are in the same file.",
    response_class=FileResponse,
    responses={200: {"content": {"application/octet-stream": {}}, "description": "A safetensors file"}},
)
async def get_model_adapter(model_id: str, context: ContextDep, principal: PrincipalDep) -> FileResponse:
    return await _model_file(context, principal, model_id, adapter=True)


@router.post(
    "/{model_id}/evaluate",
    response_model=Evaluation | JobOut,
    summary="Evaluate a model on a labelled dataset",
    description=(
        "Accuracy, macro-F1, per-class precision/recall/F1 and the confusion matrix, classes matched by name. "
        "Answered directly (200) when the evaluation takes at most `GRAFT_EVALUATE_SYNC_SECONDS` (5 s), as the "
        "model's measured cost per example on this server predicts, and the dataset has at most "
        "`GRAFT_EVALUATE_SYNC_MAX_EXAMPLES` examples; otherwise an evaluation job is created at once (202, "
        "`object: job`) whose `metrics` hold the same once it succeeded."
    ),
    responses={202: {"model": JobOut, "description": "Queued as an evaluation job"}},
)
async def evaluate_model(
    model_id: str,
    body: EvaluateRequest,
    request: Request,
    response: Response,
    context: ContextDep,
    principal: PrincipalDep,
) -> Any:
    result, answered = await evaluation.evaluate(context, request, principal, model_id, body.dataset)
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
        param = param_from_loc(tuple(first["loc"])) or "inputs"
        raise Unprocessable(f"{param}: {first['msg']}", param=param, code="invalid_request") from None
    return list(body.inputs)


async def _image_inputs(request: Request, max_files: int) -> list[tuple[str, bytes]]:
    _, options = parse_options_header(request.headers.get("content-type", ""))
    boundary = options.get(b"boundary", b"")
    if not boundary or len(boundary) > MAX_BOUNDARY_CHARS:
        raise InvalidRequest(
            f"a multipart boundary of 1 to {MAX_BOUNDARY_CHARS} characters is required in Content-Type",
            param="Content-Type",
        )
    try:
        form = await request.form(max_files=max_files + 1, max_fields=8)
    except GraftError:
        raise
    except Exception as exc:  # malformed multipart bodies
        raise InvalidRequest(
            f"malformed multipart body ({type(exc).__name__}: {exc})"[:300], param="files"
        ) from None
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
        "image models multipart `files` (PNG/JPEG of any size and colour mode, converted exactly as in training). "
        "Each prediction has the `label` and the probabilities of the `top_k` most probable classes (5 unless "
        "set), the most probable first.\n\n"
        "Bounds per request: `GRAFT_MAX_PREDICT_INPUTS` inputs (256); a text of at most `GRAFT_MAX_TEXT_CHARS` "
        "characters (20,000) and `GRAFT_MAX_PREDICT_CHARS` (1,000,000) in all; images of at most "
        "`GRAFT_MAX_PREDICT_PIXELS` pixels in all (100 million), counted from their headers before any is "
        "decoded; JSON bodies of at most `GRAFT_MAX_JSON_BYTES` (8 MiB). A text model reads only the first "
        "`max_length` tokens of a text (its `input_spec`): longer texts are cut before tokenising, exactly as in "
        "training."
    ),
    openapi_extra=PREDICT_BODY,
)
async def predict(
    model_id: str,
    request: Request,
    context: ContextDep,
    principal: PrincipalDep,
    top_k: Annotated[
        int,
        Query(
            ge=1, le=1000, description="How many classes to give probabilities for, the most probable first."
        ),
    ] = 5,
) -> dict[str, Any]:
    if model_id in BUILTIN_MODELS:
        raise InvalidRequest(
            f"{model_id} is an upstream model without a classification head; fine-tune it, then predict with "
            "the job's result_model",
            param="model",
            code="model_not_servable",
        )
    row = await context.db.read(service.get_registered, principal, model_id)
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
    # Bounds first (characters, pixels from the images' headers: cheap, on a thread for the headers), then the
    # model's turn (waited for in the event loop, holding no thread), then the prediction threads.
    server = context.model_server
    columns = row.spec.get("input_spec", {}).get("feature_columns", [])
    checked = await context.blocking(server.check_inputs, row.modality, inputs, columns)
    async with server.turn(row):
        predictions = await context.predict(server.predict, row, inputs, top_k=top_k)
    return {"model": row.id, "predictions": predictions, "ignored_columns": list(checked.ignored_columns)}
