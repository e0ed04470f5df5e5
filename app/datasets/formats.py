"""Dataset formats: validation at upload and reading for training, from one set of parsers.

- CSV (UTF-8, header row) and JSONL (one JSON object per line) for text and tabular data;
- ZIP of PNG/JPEG images: one folder per class (labelled) or images at the root (unlabelled).

Every problem raises FormatError whose message names the row, line or file and the column. Archives
are read in place and never extracted; unsafe members (absolute or `..` paths, links, encryption) and
zip bombs (member count, total size, compression ratio) are refused before any image is decoded.
This module knows nothing of the database or HTTP.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
import stat
import struct
import warnings
import zipfile
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
from PIL import Image

from app.core.text import unsafe_character

TASKS = ("text_classification", "image_classification", "tabular_classification")
IMAGE_EXTENSIONS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG"}
DEFAULT_TEXT_COLUMN = "text"
DEFAULT_LABEL_COLUMN = "label"
MAX_LINE_BYTES = 16 * 1024 * 1024
MAX_IMAGE_BYTES = 64 * 1024 * 1024
MAX_FEATURES = 10_000
MAX_LABEL_CHARS = 1000
FLOAT32_MAX = 3.4028234663852886e38
csv.field_size_limit(MAX_LINE_BYTES)


class FormatError(ValueError):
    def __init__(self, message: str, *, param: str = "file") -> None:
        super().__init__(message)
        self.message = message
        self.param = param


@dataclass(frozen=True)
class ArchiveLimits:
    max_members: int = 50_000
    max_uncompressed_bytes: int = 8 * 1024**3
    max_compression_ratio: float = 200.0
    max_image_pixels: int = 40_000_000


@dataclass
class DatasetInfo:
    format: str
    num_examples: int
    labeled: bool
    classes: list[str]
    class_counts: dict[str, int]
    schema_info: dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------------------------ detection


def detect_format(filename: str | None, head: bytes) -> str:
    """csv | jsonl | zip, from the file name, checked against the first bytes."""
    suffix = PurePosixPath(filename or "").suffix.lower()
    is_zip = head.startswith(b"PK\x03\x04") or head.startswith(b"PK\x05\x06")
    if suffix == ".zip" or (not suffix and is_zip):
        if not is_zip:
            raise FormatError(f"'{filename}' is named .zip but is not a ZIP archive")
        return "zip"
    if suffix not in (".jsonl", ".ndjson", ".csv", ".txt", ""):
        # Checked before the ZIP signature: an .xlsx or .docx is a ZIP too, and renaming it will not help.
        raise FormatError(f"unsupported file type '{suffix}': upload a .csv, .jsonl or .zip file")
    if is_zip:
        raise FormatError(f"'{filename}' is a ZIP archive; name it .zip")
    if suffix in (".jsonl", ".ndjson"):
        return "jsonl"
    stripped = head.lstrip(b"\xef\xbb\xbf \t\r\n")
    return "jsonl" if suffix != ".csv" and stripped.startswith(b"{") else "csv"


def expected_formats(task: str) -> tuple[str, ...]:
    return ("zip",) if task == "image_classification" else ("csv", "jsonl")


# ------------------------------------------------------------------------------------ records


# A NUL, or (decoded with surrogateescape) a byte that is not UTF-8: found per field, so the error names
# the row and column; the text layer decodes ahead in 8 KiB chunks, so its errors cannot name the line.
_BAD_CHARACTER = re.compile("[\x00\udc80-\udcff]")


def _check_characters(where: str, columns: list[str], values: list[str]) -> None:
    for column, value in zip(columns, values, strict=False):
        found = _BAD_CHARACTER.search(value)
        if found:
            problem = "contains a NUL character" if found.group() == "\x00" else "not valid UTF-8 text"
            raise FormatError(f"{where}, {column}: {problem}")


def _csv_records(path: Path) -> Iterator[tuple[str, int, dict[str, str]]]:
    """(where, data row number, record) for every non-blank data row; `where` reads 'row 3 (line 4)'."""
    with path.open("r", encoding="utf-8-sig", errors="surrogateescape", newline="") as handle:
        reader = csv.reader(handle)
        try:
            try:
                header = next(reader)
            except StopIteration:
                raise FormatError("the file is empty: expected a header row") from None
            _check_characters("header", [f"column {n}" for n in range(1, len(header) + 1)], header)
            header = [name.strip() for name in header]
            for position, name in enumerate(header, 1):
                if not name:
                    raise FormatError(f"header: column {position} has no name")
            duplicates = sorted(name for name, n in Counter(header).items() if n > 1)
            if duplicates:
                raise FormatError(f"header: duplicate column name '{duplicates[0]}'")
            yield "header", 0, {name: name for name in header}
            columns = [f"column '{name}'" for name in header]
            row = 0
            for record in reader:
                if not record or (len(record) == 1 and not record[0].strip()):
                    continue
                row += 1
                where = f"row {row} (line {reader.line_num})"
                _check_characters(where, columns, record)
                if len(record) != len(header):
                    raise FormatError(f"{where}: expected {len(header)} fields, found {len(record)}")
                yield where, row, dict(zip(header, record, strict=True))
        except csv.Error as exc:
            raise FormatError(f"line {reader.line_num}: malformed CSV ({exc})") from None


def _jsonl_records(path: Path) -> Iterator[tuple[str, int, dict[str, Any]]]:
    with path.open("rb") as handle:
        row = 0
        line_no = 0
        while True:
            raw = handle.readline(MAX_LINE_BYTES + 1)
            if not raw:
                break
            line_no += 1
            if len(raw) > MAX_LINE_BYTES:
                raise FormatError(f"line {line_no}: longer than {MAX_LINE_BYTES // (1024 * 1024)} MiB")
            if line_no == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise FormatError(f"line {line_no}: not valid UTF-8 text") from None
            if not text.strip():
                continue
            try:
                record = json.loads(text)
            except json.JSONDecodeError as exc:
                raise FormatError(f"line {line_no}: invalid JSON ({exc.msg})") from None
            except (ValueError, RecursionError) as exc:  # numbers too long to convert, nesting too deep
                raise FormatError(f"line {line_no}: invalid JSON ({type(exc).__name__})") from None
            if not isinstance(record, dict):
                raise FormatError(f"line {line_no}: expected a JSON object, found {type(record).__name__}")
            for key, value in record.items():
                for part in (key, value) if isinstance(value, str) else (key,):
                    problem = unsafe_character(part)
                    if problem:
                        raise FormatError(f"line {line_no}, column '{key!r}': contains {problem}")
            row += 1
            yield f"line {line_no}", row, record


def _records(path: Path, fmt: str) -> Iterator[tuple[str, int, dict[str, Any]]]:
    """Header-first record stream: CSV yields its header as the first item; JSONL yields its first
    record's keys as the 'header' so both formats resolve columns the same way."""
    if fmt == "csv":
        yield from _csv_records(path)
        return
    records = _jsonl_records(path)
    first = next(records, None)
    if first is None:
        raise FormatError("the file has no records")
    yield "header", 0, {key: key for key in first[2]}
    yield first
    yield from records


def _label_value(value: Any, where: str, column: str) -> str | None:
    if value is None:
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        if abs(value) >= 10**MAX_LABEL_CHARS:
            raise FormatError(f"{where}, column '{column}': label longer than {MAX_LABEL_CHARS} characters")
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise FormatError(f"{where}, column '{column}': label must be finite")
        return str(int(value)) if value.is_integer() else str(value)
    if isinstance(value, str):
        if len(value) > MAX_LABEL_CHARS:
            raise FormatError(f"{where}, column '{column}': label longer than {MAX_LABEL_CHARS} characters")
        return value.strip() or None
    raise FormatError(f"{where}, column '{column}': label must be a string or a number")


def _resolve_label_column(header: dict[str, Any], label_column: str | None) -> str | None:
    if label_column is not None:
        if label_column not in header:
            raise FormatError(
                f"label column '{label_column}' not found (columns: {', '.join(header)})",
                param="label_column",
            )
        return label_column
    return DEFAULT_LABEL_COLUMN if DEFAULT_LABEL_COLUMN in header else None


def _check_classes(counts: Counter[str], label_column: str | None) -> tuple[list[str], dict[str, int]]:
    """label_column None: the classes are an archive's folder names, which no request field names."""
    classes = sorted(counts)
    if len(classes) < 2:
        only = f" ('{classes[0]}')" if classes else ""
        source = f"the label column '{label_column}'" if label_column else "the archive"
        raise FormatError(
            f"{source} has a single class{only}; classification needs at least two",
            param="label_column" if label_column else "file",
        )
    return classes, {name: counts[name] for name in classes}


# ------------------------------------------------------------------------------------ text


def iter_text(
    path: Path, fmt: str, text_column: str | None, label_column: str | None
) -> Iterator[tuple[str, str, str | None]]:
    """(where, text, label) for every example; the first item is ('columns', text_col, label_col)."""
    records = _records(path, fmt)
    _, _, header = next(records)
    text_col = text_column or DEFAULT_TEXT_COLUMN
    if text_col not in header:
        raise FormatError(
            f"text column '{text_col}' not found (columns: {', '.join(header)})", param="text_column"
        )
    label_col = _resolve_label_column(header, label_column)
    yield "columns", text_col, label_col
    for where, _row, record in records:
        if text_col not in record:
            raise FormatError(f"{where}: missing the text column '{text_col}'")
        text = record[text_col]
        if not isinstance(text, str):
            raise FormatError(f"{where}, column '{text_col}': text must be a string")
        if not text.strip():
            raise FormatError(f"{where}, column '{text_col}': empty text")
        label = None
        if label_col is not None:
            label = _label_value(record.get(label_col), where, label_col)
            if label is None:
                raise FormatError(f"{where}, column '{label_col}': missing label")
        yield where, text, label


def _summarise(
    fmt: str, rows: Iterator[tuple[str, Any, str | None]], label_col: str | None, schema_info: dict[str, Any]
) -> DatasetInfo:
    """Count the examples and classes of a validated row stream."""
    counts: Counter[str] = Counter()
    n = 0
    for _where, _value, label in rows:
        n += 1
        if label is not None:
            counts[label] += 1
    if n == 0:
        raise FormatError("the file has a header but no rows")
    classes, class_counts = _check_classes(counts, label_col) if label_col else ([], {})
    return DatasetInfo(
        format=fmt,
        num_examples=n,
        labeled=label_col is not None,
        classes=classes,
        class_counts=class_counts,
        schema_info={**schema_info, "label_column": label_col},
    )


def inspect_text(path: Path, fmt: str, text_column: str | None, label_column: str | None) -> DatasetInfo:
    rows = iter_text(path, fmt, text_column, label_column)
    _, text_col, label_col = next(rows)
    return _summarise(fmt, rows, label_col, {"text_column": text_col})


def read_text(path: Path, fmt: str, schema_info: dict[str, Any]) -> tuple[list[str], list[str] | None]:
    rows = iter_text(path, fmt, schema_info["text_column"], schema_info.get("label_column"))
    _, _, label_col = next(rows)
    texts: list[str] = []
    labels: list[str] = []
    for _where, text, label in rows:
        texts.append(text)
        if label is not None:
            labels.append(label)
    return texts, (labels if label_col else None)


# ------------------------------------------------------------------------------------ tabular


def _number(value: Any, where: str, column: str) -> float:
    if isinstance(value, bool):
        raise FormatError(f"{where}, column '{column}': {value!r} is not a number")
    if isinstance(value, int | float):
        try:
            number = float(value)
        except OverflowError:
            number = math.inf
    elif isinstance(value, str):
        if not value.strip():
            raise FormatError(f"{where}, column '{column}': missing value")
        try:
            number = float(value.strip())
        except ValueError:
            raise FormatError(f"{where}, column '{column}': '{value}' is not a number") from None
    elif value is None:
        raise FormatError(f"{where}, column '{column}': missing value")
    else:
        raise FormatError(f"{where}, column '{column}': {type(value).__name__} is not a number")
    if not math.isfinite(number) or abs(number) > FLOAT32_MAX:
        raise FormatError(f"{where}, column '{column}': value must be finite (within float32 range)")
    return number


def iter_tabular(
    path: Path, fmt: str, label_column: str | None
) -> Iterator[tuple[str, list[float] | list[str], str | None]]:
    """First item: ('columns', feature_columns, label_col); then (where, features, label)."""
    records = _records(path, fmt)
    _, _, header = next(records)
    label_col = _resolve_label_column(header, label_column)
    features = [name for name in header if name != label_col]
    if not features:
        raise FormatError("no feature columns: a tabular dataset needs at least one numeric column")
    if len(features) > MAX_FEATURES:
        raise FormatError(f"{len(features)} feature columns; at most {MAX_FEATURES} are supported")
    yield "columns", features, label_col
    expected = set(header)
    for where, _row, record in records:
        if fmt == "jsonl" and set(record) != expected:
            missing = sorted(expected - set(record))
            extra = sorted(set(record) - expected)
            problem = f"missing column '{missing[0]}'" if missing else f"unexpected column '{extra[0]}'"
            raise FormatError(f"{where}: {problem} (every line needs the keys of the first)")
        values = [_number(record[name], where, name) for name in features]
        label = None
        if label_col is not None:
            label = _label_value(record.get(label_col), where, label_col)
            if label is None:
                raise FormatError(f"{where}, column '{label_col}': missing label")
        yield where, values, label


def inspect_tabular(path: Path, fmt: str, label_column: str | None) -> DatasetInfo:
    rows = iter_tabular(path, fmt, label_column)
    _, features, label_col = next(rows)
    return _summarise(fmt, rows, label_col, {"feature_columns": list(features)})


def read_tabular(path: Path, fmt: str, schema_info: dict[str, Any]) -> tuple[np.ndarray, list[str] | None]:
    rows = iter_tabular(path, fmt, schema_info.get("label_column"))
    _, features, label_col = next(rows)
    if list(features) != list(schema_info["feature_columns"]):
        raise FormatError("the file's columns changed since upload")
    values: list[list[float]] = []
    labels: list[str] = []
    for _where, row_values, label in rows:
        values.append(row_values)  # type: ignore[arg-type]
        if label is not None:
            labels.append(label)
    return np.asarray(values, dtype=np.float32), (labels if label_col else None)


# ------------------------------------------------------------------------------------ images


@dataclass
class ImageArchive:
    """The images of an archive: (member name, label or None), sorted by member name."""

    entries: list[tuple[str, str | None]]
    layout: str  # class_folders | flat
    root: str


_JUNK_NAMES = {".ds_store", "thumbs.db", "desktop.ini"}


def _is_junk(parts: tuple[str, ...]) -> bool:
    return parts[0] == "__MACOSX" or parts[-1].lower() in _JUNK_NAMES or parts[-1].startswith("._")


def _unsafe_reason(info: zipfile.ZipInfo) -> str | None:
    name = info.filename
    if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        return "absolute path"
    if "\\" in name:
        return "backslash in path"
    if any(part == ".." for part in name.split("/")):
        return "'..' in path"
    file_type = stat.S_IFMT(info.external_attr >> 16)  # 0 when the archiver recorded no Unix mode
    if file_type == stat.S_IFLNK:
        return "symbolic link"
    if file_type not in (0, stat.S_IFREG, stat.S_IFDIR):
        return "special file"
    if info.flag_bits & 0x1:
        return "encrypted member"
    return None


def scan_archive(archive: zipfile.ZipFile, limits: ArchiveLimits) -> ImageArchive:
    """Check every member's path, type and size, then work out the layout. Reads no member data."""
    infos = archive.infolist()
    if len(infos) > limits.max_members:
        raise FormatError(f"the archive has {len(infos)} members; at most {limits.max_members} are allowed")
    total = 0
    total_compressed = 0
    seen: set[str] = set()
    files: list[tuple[tuple[str, ...], zipfile.ZipInfo]] = []
    for info in infos:
        reason = _unsafe_reason(info)
        if reason:
            raise FormatError(f"file '{info.filename}': {reason} is not allowed in an archive")
        if info.is_dir():
            continue
        if info.filename in seen:
            raise FormatError(f"file '{info.filename}' appears twice in the archive")
        seen.add(info.filename)
        total += info.file_size
        total_compressed += info.compress_size
        if total > limits.max_uncompressed_bytes:
            raise FormatError(
                f"the archive expands to more than {limits.max_uncompressed_bytes} bytes; that is the limit"
            )
        if info.file_size > 1024 * 1024 and info.file_size > limits.max_compression_ratio * max(
            info.compress_size, 1
        ):
            raise FormatError(
                f"file '{info.filename}': compression ratio above {limits.max_compression_ratio:g} "
                "(a zip bomb?)"
            )
        parts = PurePosixPath(info.filename).parts
        if not parts or _is_junk(parts):
            continue
        files.append((parts, info))
    if total > 10 * 1024 * 1024 and total > limits.max_compression_ratio * max(total_compressed, 1):
        raise FormatError(
            f"the archive's compression ratio is above {limits.max_compression_ratio:g} (a zip bomb?)"
        )
    if not files:
        raise FormatError("the archive contains no images")

    root = ""
    tops = {parts[0] for parts, _ in files}
    if len(tops) == 1 and all(len(parts) >= 2 for parts, _ in files):
        # One folder wrapping everything (zipping a folder does this); a lone class is no labelled set.
        root = next(iter(tops)) + "/"
        files = [(parts[1:], info) for parts, info in files]

    depths = {len(parts) for parts, _ in files}
    deep = next((info.filename for parts, info in files if len(parts) > 2), None)
    if deep:
        raise FormatError(f"file '{deep}': nested folders are not supported; use one folder per class")
    if depths == {1, 2}:
        stray = next(info.filename for parts, info in files if len(parts) == 1)
        raise FormatError(
            f"file '{stray}': images are both at the top level and in class folders; use one layout"
        )
    for _parts, info in files:
        suffix = PurePosixPath(info.filename).suffix.lower()
        if suffix not in IMAGE_EXTENSIONS:
            raise FormatError(f"file '{info.filename}': not an image (expected .png, .jpg or .jpeg)")
        if info.file_size > MAX_IMAGE_BYTES:
            raise FormatError(f"file '{info.filename}': larger than {MAX_IMAGE_BYTES // (1024 * 1024)} MiB")
    layout = "class_folders" if depths == {2} else "flat"
    entries = sorted(
        (info.filename, parts[0] if layout == "class_folders" else None) for parts, info in files
    )
    return ImageArchive(entries=entries, layout=layout, root=root)


def decode_image(data: bytes, name: str, limits: ArchiveLimits, *, draft: bool = False) -> Image.Image:
    """Open and fully decode one PNG/JPEG; FormatError names the file when it is not a readable image."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            if image.format not in ("PNG", "JPEG"):
                raise FormatError(f"file '{name}': not a PNG or JPEG image (found {image.format})")
            if image.width * image.height > limits.max_image_pixels:
                raise FormatError(
                    f"file '{name}': {image.width}x{image.height} pixels is above the limit of "
                    f"{limits.max_image_pixels}"
                )
            if draft and image.format == "JPEG":
                image.draft("RGB", (64, 64))
            image.load()
            return image
    except FormatError:
        raise
    except Exception as exc:
        raise FormatError(f"file '{name}': not a readable image ({type(exc).__name__}: {exc})") from None


# What zipfile raises on damaged or exotic archives (bad headers, unknown versions, odd names).
_ZIP_ERRORS = (
    zipfile.BadZipFile,
    OSError,
    EOFError,
    ValueError,
    NotImplementedError,
    RuntimeError,
    struct.error,
    zlib.error,
)


def open_archive(path: Path) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(path)
    except _ZIP_ERRORS as exc:
        raise FormatError(f"not a valid ZIP archive ({type(exc).__name__}: {exc})") from None


def read_member(archive: zipfile.ZipFile, name: str) -> bytes:
    try:
        with archive.open(name) as member:
            return member.read(MAX_IMAGE_BYTES + 1)
    except _ZIP_ERRORS as exc:
        raise FormatError(f"file '{name}': cannot be read from the archive ({exc})") from None


def inspect_images(path: Path, limits: ArchiveLimits) -> DatasetInfo:
    with open_archive(path) as archive:
        scanned = scan_archive(archive, limits)
        for name, _label in scanned.entries:
            decode_image(read_member(archive, name), name, limits, draft=True)
    counts = Counter(label for _, label in scanned.entries if label is not None)
    labeled = scanned.layout == "class_folders"
    classes, class_counts = _check_classes(counts, None) if labeled else ([], {})
    return DatasetInfo(
        format="zip",
        num_examples=len(scanned.entries),
        labeled=labeled,
        classes=classes,
        class_counts=class_counts,
        schema_info={"layout": scanned.layout, "root": scanned.root},
    )


# ------------------------------------------------------------------------------------ entry point


def inspect_dataset(
    path: Path,
    *,
    task: str,
    fmt: str,
    text_column: str | None = None,
    label_column: str | None = None,
    limits: ArchiveLimits | None = None,
) -> DatasetInfo:
    if fmt not in expected_formats(task):
        wanted = " or ".join(expected_formats(task))
        raise FormatError(f"{task} datasets are uploaded as {wanted}, not {fmt}")
    if task == "text_classification":
        return inspect_text(path, fmt, text_column, label_column)
    if task == "tabular_classification":
        if text_column is not None:
            raise FormatError("text_column applies to text_classification datasets only", param="text_column")
        return inspect_tabular(path, fmt, label_column)
    if task == "image_classification":
        if text_column is not None or label_column is not None:
            raise FormatError(
                "image datasets take their labels from folder names; omit text_column and label_column",
                param="label_column" if label_column is not None else "text_column",
            )
        return inspect_images(path, limits or ArchiveLimits())
    raise FormatError(f"unknown task '{task}'", param="task")
