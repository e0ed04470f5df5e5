"""Importing weights trained elsewhere: a safetensors file and a config naming a built-in architecture and
its classes, or a file exported by Graft, which carries its config (`graft_spec` in its metadata).

Both kinds of config go through one validation (`validate_spec`), with the same limits, before anything
is built. Then the tensors named in the file's header are compared with the architecture's, computed on
PyTorch's meta device (shapes only, no memory), and the parameter count is bounded; only then is the
network built for real and the tensors loaded. Nothing is ever unpickled.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError
from sqlalchemy.orm import Session

from app.core.errors import Unprocessable
from app.core.security import Principal
from app.datasets.upload import ReceivedUpload
from app.models import repository
from app.models.schemas import ImportConfig
from graft.catalog import BUILTIN_MODELS, BuiltinModel
from graft.db import after_rollback
from graft.ids import new_id, utcnow
from graft.spec import SPEC_METADATA_KEY, ModelSpec
from graft.storage import Storage, sha256_file
from graft.tables import Model
from graft.text import unsafe_character

if TYPE_CHECKING:
    from torch import Tensor

FLOAT_DTYPES = {"F16", "BF16", "F32", "F64"}
INT_DTYPES = {"I8", "I16", "I32", "I64", "U8"}

# The limits datasets have (GRAFT_MAX_CLASSES, GRAFT_MAX_CLASS_CHARS, GRAFT_MAX_COLUMN_CHARS); the API
# passes the configured ones.
MAX_CLASSES = 1000
MAX_CLASS_CHARS = 200
MAX_COLUMN_CHARS = 200
# A tabular dataset's column limit (graft.formats.MAX_FEATURES): an mlp reads at most that many.
MAX_FEATURE_COLUMNS = 10_000
# What the architectures can be given. The pretrained MiniLM encoder has 6 layers (a distillation student
# keeps the bottom ones); cnn-small widths and mlp sizes are those a distillation student may have, and
# an mlp at most 8 hidden layers, as an import config always allowed.
MINILM_LAYERS = (1, BUILTIN_MODELS["minilm-l6"].num_blocks)
CNN_WIDTH = (4, 256)
MLP_HIDDEN_SIZE = (1, 4096)
ADAPTER_WIDTH = (1, 4096)
MLP_MAX_HIDDEN_LAYERS = 8
MAX_LENGTH_TOKENS = (8, 512)
# The largest network any import may build (the limits above stay below it; this bounds what they add up
# to, whatever they become).
MAX_PARAMETERS = 64_000_000  # minilm-l6, the largest built-in, has 23 M
# A graft_spec is parsed into Python objects: bound the text first. The largest a Graft export writes is
# 10,000 feature columns and 1,000 classes of 200 characters, JSON-escaped (up to 12 characters each).
MAX_SPEC_CHARS = 32 * 1024 * 1024
# Far more tensors than any built-in architecture has (efficientnet-lite0: about 300).
MAX_TENSORS = 10_000

SPEC_FIELDS = ("architecture", "modality", "classes", "input_spec", "options")
# input_spec fields that only describe (the catalog's text is kept whatever a file says); every other
# field of the catalog's input_spec configures preprocessing and must be the architecture's own.
DESCRIPTIVE_INPUT_FIELDS = {"tokenizer", "resize", "features", "hidden"}
# input_spec fields a model carries beyond the catalog's: the columns an mlp was trained on.
EXTRA_INPUT_FIELDS: dict[str, set[str]] = {"mlp": {"feature_columns"}}
# input_spec fields set by the training data rather than the catalog: a resnet-small's input size and
# colour (checked together, after the loop).
SIZED_BY_DATA: dict[str, set[str]] = {"resnet-small": {"channels", "height", "width", "mean", "std"}}
IMAGE_SIDE = (16, 128)
STEM_STRIDES = (1, 2, 4)


@dataclass(frozen=True)
class ImportLimits:
    max_classes: int = MAX_CLASSES
    max_class_chars: int = MAX_CLASS_CHARS
    max_column_chars: int = MAX_COLUMN_CHARS
    max_parameters: int = MAX_PARAMETERS


# ------------------------------------------------------------------------------------ where a spec is from


@dataclass(frozen=True)
class SpecSource:
    """Where a spec came from, so that a refusal names what the client wrote: a field of the `config` part,
    or a field inside the weights file's graft_spec (`field` is the spec's path, such as options.hidden)."""

    config_part: bool

    # The spec's fields as the config part names them.
    CONFIG_FIELDS = {
        "architecture": "architecture",
        "classes": "classes",
        "options.hidden": "hidden",
        "options.layers": "layers",
        "options.width": "width",
        "options.in_features": "feature_columns",
        "input_spec.feature_columns": "feature_columns",
        "input_spec.max_length": "max_length",
    }

    def refuse(self, field: str, message: str) -> Unprocessable:
        if not self.config_part:
            where = f", {field}" if field else ""
            return Unprocessable(
                f"weights: the file's graft_spec (the config Graft writes into the files it exports){where}: "
                f"{message}",
                param="weights",
                code="invalid_request",
            )
        path, bracket, index = field.partition("[")
        name = self.CONFIG_FIELDS.get(path)
        if name is None:
            return Unprocessable(f"config: {message}", param="config", code="invalid_request")
        return Unprocessable(
            f"config.{name}{bracket}{index}: {message}", param=f"config.{name}", code="invalid_request"
        )


CONFIG_PART = SpecSource(config_part=True)
EMBEDDED_SPEC = SpecSource(config_part=False)


def _show(value: object, limit: int = 40) -> str:
    """A value for a message: short, ASCII (a lone surrogate cannot be encoded in a JSON response), and
    never the repr of a whole document (which can be nested as deep as the parser went)."""
    if isinstance(value, str):
        return ascii(value[:limit]) + ("..." if len(value) > limit else "")
    if isinstance(value, list) and len(value) <= 8 and not any(isinstance(v, list | dict) for v in value):
        shown = "[" + ", ".join(_show(item, 20) for item in value) + "]"
        return shown if len(shown) <= 2 * limit else shown[: 2 * limit] + "..."
    if isinstance(value, list | dict):
        return f"{_json_type(value)} of {len(value)} item{'' if len(value) == 1 else 's'}"
    return ascii(value)[:limit]


def _json_type(value: object) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}
    for kind, name in names.items():
        if isinstance(value, kind):
            return name
    return "a number"


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _first_unsafe(data: object) -> tuple[str, str] | None:
    """The path of the first string (key or value) no store can hold, and why; iterative, as a parsed JSON
    document can be nested as deep as the parser allows."""
    stack: list[tuple[str, object]] = [("", data)]
    while stack:
        path, value = stack.pop()
        if isinstance(value, str):
            problem = unsafe_character(value)
            if problem:
                return path, problem
        elif isinstance(value, dict):
            for key, item in value.items():
                problem = unsafe_character(key)
                if problem:
                    return path or "(a field name)", problem
                stack.append((f"{path}.{key}" if path else key, item))
        elif isinstance(value, list):
            stack.extend((f"{path}[{i}]", item) for i, item in enumerate(value))
    return None


# ------------------------------------------------------------------------------------ one validation


def validate_spec(data: object, source: SpecSource, limits: ImportLimits) -> ModelSpec:
    """The ModelSpec `data` describes (a decoded JSON document in ModelSpec's shape), or a 422 naming the
    field that is wrong. Checks only: nothing is built, and every size is bounded before it is used."""
    if not isinstance(data, dict):
        raise source.refuse("", f"must be a JSON object, not {_json_type(data)}")
    unsafe = _first_unsafe(data)
    if unsafe is not None:
        raise source.refuse(_field("", unsafe[0]), f"contains {unsafe[1]}")
    unknown = sorted(str(key) for key in data if key not in SPEC_FIELDS)
    if unknown:
        raise source.refuse(_field("", unknown[0]), f"unknown field (the fields: {', '.join(SPEC_FIELDS)})")
    architecture = data.get("architecture")
    if not isinstance(architecture, str) or architecture not in BUILTIN_MODELS:
        known = ", ".join(BUILTIN_MODELS)
        raise source.refuse("architecture", f"unknown architecture {_show(architecture)} (built-in: {known})")
    builtin = BUILTIN_MODELS[architecture]
    modality = data.get("modality")
    if modality != builtin.modality:
        given = "missing" if modality is None else _show(modality)
        raise source.refuse("modality", f"{architecture} takes {builtin.modality} inputs ({given} given)")
    classes = _check_classes(data.get("classes", []), source, limits)
    input_spec = _check_input_spec(builtin, data.get("input_spec", {}), source, limits)
    options = _check_options(architecture, data.get("options", {}), source)
    if architecture == "mlp" and options["in_features"] != len(input_spec["feature_columns"]):
        raise source.refuse(
            "options.in_features",
            f"is {options['in_features']}, but input_spec.feature_columns names "
            f"{len(input_spec['feature_columns'])} columns",
        )
    return ModelSpec(
        architecture=architecture,
        modality=builtin.modality,
        classes=classes,
        input_spec=input_spec,
        options=options,
    )


def _check_names(
    value: object, field: str, what: str, max_count: int, max_chars: int, source: SpecSource
) -> list[str]:
    """A list of distinct, non-blank strings of at most `max_chars`, at most `max_count` of them."""
    if not isinstance(value, list):
        raise source.refuse(field, f"must be a list of strings, not {_json_type(value)}")
    if len(value) > max_count:
        raise source.refuse(field, f"at most {max_count} {what} ({len(value)} given)")
    seen: set[str] = set()
    for i, name in enumerate(value):
        if not isinstance(name, str):
            raise source.refuse(f"{field}[{i}]", f"must be a string, not {_json_type(name)}")
        if not name.strip():
            raise source.refuse(f"{field}[{i}]", "is empty")
        if len(name) > max_chars:
            raise source.refuse(f"{field}[{i}]", f"is longer than {max_chars} characters ({len(name)} given)")
        if name in seen:
            raise source.refuse(f"{field}[{i}]", f"{_show(name)} is there twice: {what} must be distinct")
        seen.add(name)
    return list(value)


def _check_classes(value: object, source: SpecSource, limits: ImportLimits) -> list[str]:
    classes = _check_names(value, "classes", "classes", limits.max_classes, limits.max_class_chars, source)
    if len(classes) == 1:
        raise source.refuse(
            "classes", "a classifier needs at least two classes (or none, for a bare backbone)"
        )
    return classes


def _int_in(value: object, bounds: tuple[int, int], field: str, source: SpecSource) -> int:
    low, high = bounds
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise source.refuse(field, f"must be an integer from {low} to {high} ({_show(value)} given)")
    return value


def _field(prefix: str, key: str) -> str:
    # Field names were checked for unsafe characters; a long one is cut for the message.
    name = key[:60] + ("..." if len(key) > 60 else "")
    return f"{prefix}.{name}" if prefix else name


def _check_input_spec(
    builtin: BuiltinModel, value: object, source: SpecSource, limits: ImportLimits
) -> dict[str, Any]:
    """The architecture's own input_spec, with what a model legitimately sets itself (minilm-l6's
    max_length, an mlp's feature_columns)."""
    if not isinstance(value, dict):
        raise source.refuse("input_spec", f"must be an object, not {_json_type(value)}")
    catalog = builtin.input_spec
    allowed = set(catalog) | EXTRA_INPUT_FIELDS.get(builtin.id, set())
    result = dict(catalog)
    for key, given in value.items():
        field = _field("input_spec", key)
        if key not in allowed:
            fields = ", ".join(sorted(allowed))
            raise source.refuse(field, f"does not apply to {builtin.id} (its input_spec fields: {fields})")
        if key == "max_length" and builtin.id == "minilm-l6":
            result[key] = _int_in(given, MAX_LENGTH_TOKENS, field, source)
        elif key == "feature_columns":
            result[key] = _check_names(
                given, field, "feature columns", MAX_FEATURE_COLUMNS, limits.max_column_chars, source
            )
        elif key in DESCRIPTIVE_INPUT_FIELDS:
            pass  # a description: the catalog's stays
        elif key in SIZED_BY_DATA.get(builtin.id, set()):
            result[key] = given
        elif isinstance(given, bool) or given != catalog[key]:
            raise source.refuse(
                field, f"must be {catalog[key]!r}, {builtin.id}'s own preprocessing ({_show(given)} given)"
            )
    if builtin.id in SIZED_BY_DATA:
        _check_image_geometry(result, source)
    if "feature_columns" in allowed:
        columns = result.get("feature_columns")
        if not columns:
            raise source.refuse(
                "input_spec.feature_columns", "an mlp needs its feature_columns (its input columns, in order)"
            )
    return result


def _check_image_geometry(input_spec: dict[str, Any], source: SpecSource) -> None:
    """A network sized by its data: 1 or 3 channels, a square side of 16 to 128 px, the [-1, 1] scaling."""
    channels = input_spec["channels"]
    if isinstance(channels, bool) or channels not in (1, 3):
        raise source.refuse("input_spec.channels", f"must be 1 or 3 ({_show(channels)} given)")
    for key in ("height", "width"):
        _int_in(input_spec[key], IMAGE_SIDE, f"input_spec.{key}", source)
    if input_spec["height"] != input_spec["width"]:
        raise source.refuse("input_spec.width", "must equal input_spec.height (square inputs)")
    for key in ("mean", "std"):
        if input_spec[key] != [0.5] * channels:
            raise source.refuse(
                f"input_spec.{key}", f"must be {[0.5] * channels!r} ({_show(input_spec[key])} given)"
            )


def _stem_stride(value: object, source: SpecSource) -> dict[str, Any]:
    if value is None:
        return {}
    if isinstance(value, bool) or value not in STEM_STRIDES:
        raise source.refuse("options.stem_stride", f"must be 1, 2 or 4 ({_show(value)} given)")
    return {"stem_stride": int(value)}  # type: ignore[call-overload]


def _layers(value: object, source: SpecSource) -> dict[str, Any]:
    return {} if value is None else {"layers": _int_in(value, MINILM_LAYERS, "options.layers", source)}


def _width(value: object, source: SpecSource) -> dict[str, Any]:
    return {} if value is None else {"width": _int_in(value, CNN_WIDTH, "options.width", source)}


def _in_features(value: object, source: SpecSource) -> dict[str, Any]:
    if value is None:
        raise source.refuse(
            "options.in_features", "an mlp needs in_features (the number of its input columns)"
        )
    return {"in_features": _int_in(value, (1, MAX_FEATURE_COLUMNS), "options.in_features", source)}


def _hidden(value: object, source: SpecSource) -> dict[str, Any]:
    if value is None:
        return {"hidden": [128, 128]}
    low, high = MLP_HIDDEN_SIZE
    if (
        not isinstance(value, list)
        or not 1 <= len(value) <= MLP_MAX_HIDDEN_LAYERS
        or not all(_is_int(size) and low <= size <= high for size in value)
    ):
        raise source.refuse(
            "options.hidden",
            f"must be a list of 1 to {MLP_MAX_HIDDEN_LAYERS} layer sizes, integers from {low} to {high} "
            f"({_show(value)} given)",
        )
    return {"hidden": [int(size) for size in value]}


def _adapter(value: object, source: SpecSource) -> dict[str, Any]:
    """The hidden width of a feature adapter over the backbone (a model of a frozen-backbone adapt or
    distill job)."""
    if value is None:
        return {}
    return {"adapter": _int_in(value, ADAPTER_WIDTH, "options.adapter", source)}


# Each architecture's options and their checks (None: not given).
OPTIONS: dict[str, dict[str, Callable[[object, SpecSource], dict[str, Any]]]] = {
    "minilm-l6": {"layers": _layers, "adapter": _adapter},
    "efficientnet-lite0": {"adapter": _adapter},
    "cnn-small": {"width": _width, "adapter": _adapter},
    "resnet-small": {"width": _width, "stem_stride": _stem_stride, "adapter": _adapter},
    "mlp": {"in_features": _in_features, "hidden": _hidden, "adapter": _adapter},
}


def _check_options(architecture: str, value: object, source: SpecSource) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise source.refuse("options", f"must be an object, not {_json_type(value)}")
    known = OPTIONS[architecture]
    for key in value:
        if key not in known:
            # The adapter is every architecture's (a model of a frozen-backbone job), not one to choose.
            own = [name for name in known if name != "adapter"]
            names = f"its options: {', '.join(own)}" if own else "it has none"
            raise source.refuse(_field("options", key), f"does not apply to {architecture} ({names})")
    options: dict[str, Any] = {}
    for key, check in known.items():
        options.update(check(value.get(key), source))
    return options


def spec_from_config(config: ImportConfig, limits: ImportLimits | None = None) -> ModelSpec:
    """The config part as a spec, through the same validation as a file's graft_spec."""
    builtin = BUILTIN_MODELS[config.architecture]
    input_spec: dict[str, Any] = dict(builtin.input_spec)
    options: dict[str, Any] = {}
    if config.feature_columns is not None:
        input_spec["feature_columns"] = list(config.feature_columns)
        if config.architecture == "mlp":
            options["in_features"] = len(config.feature_columns)
    if config.max_length is not None:
        input_spec["max_length"] = config.max_length
    for option in ("hidden", "layers", "width"):
        if getattr(config, option) is not None:
            options[option] = getattr(config, option)
    data = {
        "architecture": config.architecture,
        "modality": builtin.modality,
        "classes": list(config.classes),
        "input_spec": input_spec,
        "options": options,
    }
    return validate_spec(data, CONFIG_PART, limits or ImportLimits())


def parse_config(raw: str, limits: ImportLimits) -> tuple[ModelSpec, str | None]:
    """The `config` part: its spec and the model's name."""
    if unsafe_character(raw):
        raise Unprocessable(
            "config contains a character that cannot be stored", param="config", code="invalid_request"
        )
    try:
        config = ImportConfig.model_validate(json.loads(raw))
    except (ValueError, RecursionError) as exc:
        detail = exc.errors()[0] if isinstance(exc, ValidationError) else None
        loc = [str(part) for part in detail["loc"]] if detail else []
        message = f"{'.'.join(loc)}: {detail['msg']}" if detail else f"not valid JSON ({type(exc).__name__})"
        param = f"config.{loc[0]}" if loc else "config"
        raise Unprocessable(f"config: {message}", param=param, code="invalid_request") from None
    return spec_from_config(config, limits), config.name


def parse_embedded_spec(text: str, limits: ImportLimits) -> ModelSpec:
    """A weights file's graft_spec, checked exactly as a config part is."""
    if len(text) > MAX_SPEC_CHARS:
        raise EMBEDDED_SPEC.refuse("", f"longer than {MAX_SPEC_CHARS} characters ({len(text)})")
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise EMBEDDED_SPEC.refuse("", f"not valid JSON ({type(exc).__name__})") from None
    return validate_spec(data, EMBEDDED_SPEC, limits)


# ------------------------------------------------------------------------------------ tensors


def read_header(path: Path) -> tuple[dict[str, tuple[list[int], str]], dict[str, str]]:
    """Names, shapes and dtypes of the file's tensors, and its metadata; no tensor is read."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            names = list(handle.keys())
            if len(names) > MAX_TENSORS:
                raise Unprocessable(
                    f"weights: {len(names)} tensors; no built-in architecture has more than {MAX_TENSORS}",
                    param="weights",
                    code="tensor_mismatch",
                )
            header = {}
            for name in names:
                tensor = handle.get_slice(name)
                header[name] = (list(tensor.get_shape()), tensor.get_dtype())
            return header, dict(handle.metadata() or {})
    except Unprocessable:
        raise
    except Exception as exc:
        raise Unprocessable(f"weights: not a safetensors file ({exc})"[:500], param="weights") from None


def expected_tensors(spec: ModelSpec) -> tuple[dict[str, Tensor], int]:
    """The state dict `spec`'s network has, and its parameter count, from a build on the meta device:
    shapes and dtypes without storage, so that its size costs nothing however large it is."""
    import torch

    from ml.networks import build_model, count_parameters

    with torch.device("meta"):
        model = build_model(spec, pretrained=False)
    return model.state_dict(), count_parameters(model)


def check_tensors(
    expected: Mapping[str, Tensor], header: dict[str, tuple[list[int], str]], spec: ModelSpec
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
            f"weights: unexpected tensor {_show(extra[0], 100)} for {what}",
            param="weights",
            code="tensor_mismatch",
        )


def finite_tensors(tensors: Mapping[str, Tensor], expected: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The tensors in the architecture's dtypes; a 422 naming the first that holds NaN or infinity, or
    values its dtype cannot hold (an F64 beyond float32's range becomes infinity when cast): a model with
    such weights predicts NaN for everything."""
    import torch

    cast: dict[str, Tensor] = {}
    for name, tensor in tensors.items():
        value = tensor.to(expected[name].dtype)
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            beyond = bool(torch.isfinite(tensor).all())
            problem = (
                f"values beyond the range of {str(value.dtype).removeprefix('torch.')}, which it is used as"
                if beyond
                else "NaN or infinite values"
            )
            raise Unprocessable(
                f"weights: tensor {_show(name, 100)} holds {problem}; a model with them cannot predict",
                param="weights",
                code="non_finite_weights",
            )
        cast[name] = value
    return cast


# ------------------------------------------------------------------------------------ import


@dataclass(frozen=True)
class PreparedImport:
    """Checked, rewritten weights in a temporary file, waiting for their row."""

    temp_path: Path
    spec: ModelSpec
    name: str | None
    num_parameters: int
    size: int
    sha256: str


def prepare_import(
    storage: Storage,
    upload: ReceivedUpload,
    *,
    max_classes: int = MAX_CLASSES,
    max_class_chars: int = MAX_CLASS_CHARS,
    max_column_chars: int = MAX_COLUMN_CHARS,
    max_parameters: int = MAX_PARAMETERS,
) -> PreparedImport:
    """Everything but the row, with no unit of work open: the config validated, every tensor checked
    against the architecture, the weights rewritten (with their spec) to a temporary file. The upload is
    discarded whatever happens; on a refusal nothing is left behind."""
    from safetensors.torch import load_file

    from ml.networks import build_model
    from ml.weights import save_weights

    limits = ImportLimits(max_classes, max_class_chars, max_column_chars, max_parameters)
    try:
        unknown = sorted(set(upload.fields) - {"config"})
        if unknown:
            raise Unprocessable(
                f"unknown form field {_show(unknown[0])} (expected: weights, config)",
                param=unknown[0][:100],
                code="invalid_request",
            )
        if upload.path is None or upload.size == 0:
            raise Unprocessable(
                "a non-empty 'weights' part (safetensors) is required",
                param="weights",
                code="invalid_request",
            )
        header, metadata = read_header(upload.path)
        raw_config = upload.fields.get("config")
        name: str | None = None
        if raw_config is not None:
            spec, name = parse_config(raw_config, limits)
        elif SPEC_METADATA_KEY in metadata:
            spec = parse_embedded_spec(metadata[SPEC_METADATA_KEY], limits)
        else:
            raise Unprocessable(
                "a 'config' part (JSON naming the architecture and classes) is required",
                param="config",
                code="invalid_request",
            )
        expected, num_parameters = expected_tensors(spec)
        if num_parameters > limits.max_parameters:
            source = CONFIG_PART if raw_config is not None else EMBEDDED_SPEC
            raise source.refuse(
                "", f"describes a network of {num_parameters} parameters; at most {limits.max_parameters}"
            )
        check_tensors(expected, header, spec)
        # The header fits: what the file holds is what the architecture needs, so building it and loading
        # the tensors costs what the model is worth.
        model = build_model(spec, pretrained=False)
        try:
            tensors = load_file(str(upload.path))
        except Exception as exc:  # the header was right: the data behind it is damaged
            raise Unprocessable(
                f"weights: the tensors cannot be read ({exc})"[:500], param="weights", code="tensor_mismatch"
            ) from None
        state = finite_tensors(tensors, expected)
        del tensors
        try:
            model.load_state_dict(state, strict=True)
        except Exception as exc:
            raise Unprocessable(
                f"weights: the tensors do not load ({exc})"[:500], param="weights", code="tensor_mismatch"
            ) from None
        del state
        temp = storage.new_temp_path(".safetensors")
        try:
            save_weights(temp, model.state_dict(), spec, extra={"imported_sha256": upload.sha256})
            size, digest = temp.stat().st_size, sha256_file(temp)
        except BaseException:
            temp.unlink(missing_ok=True)
            raise
    finally:
        upload.discard()
    return PreparedImport(temp, spec, name, num_parameters, size, digest)


def register_import(
    session: Session, storage: Storage, principal: Principal, prepared: PreparedImport
) -> Model:
    """The prepared weights moved to their place and the model's row added (both undone on rollback)."""
    spec = prepared.spec
    model_id = new_id("mdl")
    key = f"models/{model_id}/model.safetensors"
    try:
        storage.commit(prepared.temp_path, key)
    finally:
        prepared.temp_path.unlink(missing_ok=True)
    after_rollback(session, lambda: storage.delete_tree(f"models/{model_id}"))
    row = Model(
        id=model_id,
        project_id=principal.project_id,
        name=prepared.name or f"{spec.architecture} imported",
        kind="imported",
        architecture=spec.architecture,
        modality=spec.modality,
        classes=list(spec.classes),
        metrics={},
        spec=spec.model_dump(),
        num_parameters=prepared.num_parameters,
        job_id=None,
        base_model=None,
        training_dataset=None,
        weights_path=key,
        weights_bytes=prepared.size,
        weights_sha256=prepared.sha256,
        created_at=utcnow(),
    )
    repository.add(session, row)
    return row


def import_model(
    session: Session,
    storage: Storage,
    principal: Principal,
    upload: ReceivedUpload,
    *,
    max_classes: int = MAX_CLASSES,
    max_class_chars: int = MAX_CLASS_CHARS,
    max_column_chars: int = MAX_COLUMN_CHARS,
    max_parameters: int = MAX_PARAMETERS,
) -> Model:
    """prepare_import, then register_import in `session`."""
    prepared = prepare_import(
        storage,
        upload,
        max_classes=max_classes,
        max_class_chars=max_class_chars,
        max_column_chars=max_column_chars,
        max_parameters=max_parameters,
    )
    return register_import(session, storage, principal, prepared)
