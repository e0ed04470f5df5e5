"""Dataset formats: validation at upload and reading for training, from one set of parsers.

- CSV (UTF-8, header row) and JSONL (one JSON object per line) for text and tabular data;
- ZIP of PNG/JPEG images: one folder per class (labelled) or images at the root (unlabelled).

Every problem raises FormatError whose message names the row, line or file and the column. Archives
are read in place and never extracted; unsafe members (absolute or `..` paths, links, encryption) and
zip bombs (member count, total size, compression ratio) are refused before any image is read. Images
are checked from their headers (format, pixels per image and per archive) and for damage without
decoding them whole. Validation at upload applies the limits of ArchiveLimits (classes, label and column
name lengths, pixels); reading for training applies none of them, so a dataset accepted once stays
readable. This module knows nothing of the database or HTTP.
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

from graft.errors import InvalidData
from graft.text import unsafe_character

TASKS = ("text_classification", "image_classification", "tabular_classification")
IMAGE_EXTENSIONS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG"}
DEFAULT_TEXT_COLUMN = "text"
DEFAULT_LABEL_COLUMN = "label"
MAX_LINE_BYTES = 16 * 1024 * 1024
MAX_IMAGE_BYTES = 64 * 1024 * 1024
MAX_FEATURES = 10_000
FLOAT32_MAX = 3.4028234663852886e38
# The largest magnitude a table value may have. Training and serving work in float32, which ends at 3.4e38:
# a column of values near that overflows as soon as it is summed or standardised (its mean, its spread),
# and the run's loss becomes NaN. No measurement needs more than this (nanosecond timestamps are 1.7e18).
MAX_TABLE_MAGNITUDE = 1e30
csv.field_size_limit(MAX_LINE_BYTES)


class FormatError(InvalidData, ValueError):
    """A dataset file or an input that does not parse; `param` names the file, row or field."""

    def __init__(self, message: str, *, param: str = "file") -> None:
        super().__init__(message, param=param)
        self.param: str = param


# Below this many uncompressed bytes a compression ratio says nothing: DEFLATE's few bytes of framing
# make 6 KiB of zeros (a .DS_Store, a __MACOSX resource fork) look like 300:1, and inflating 64 KiB costs
# microseconds. Above it the ratio is checked at every size, for each member and for the whole archive
# (the members under it are still counted in the whole archive's ratio).
RATIO_FLOOR_BYTES = 64 * 1024


@dataclass(frozen=True)
class ArchiveLimits:
    """The limits an upload is validated against. The name is historical: the class and column limits
    apply to text and tabular datasets too."""

    max_members: int = 50_000
    max_uncompressed_bytes: int = 8 * 1024**3
    max_compression_ratio: float = 200.0
    max_image_pixels: int = 40_000_000
    # width * height summed over the images of one archive: what decoding them all for training costs.
    max_archive_pixels: int = 1_000_000_000
    # Distinct labels of a dataset (text and tabular label columns, image class folders): every class is
    # stored with the dataset and returned by every GET, and becomes an output of the model's head.
    max_classes: int = 1000
    max_class_chars: int = 200
    max_column_chars: int = 200


@dataclass
class DatasetInfo:
    format: str
    num_examples: int
    labeled: bool
    classes: list[str]
    class_counts: dict[str, int]
    schema_info: dict[str, Any] = field(default_factory=dict)
    pixels: int | None = None  # images: the pixels of all of them, from their headers
    # What the data holds, for people and for pricing jobs: images' sizes, texts' mean length.
    profile: dict[str, Any] = field(default_factory=dict)


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


def _check_column_names(where: str, header: dict[str, Any], max_chars: int) -> None:
    for position, name in enumerate(header, 1):
        if len(name) > max_chars:
            raise FormatError(
                f"{where}: the name of column {position} is longer than {max_chars} characters "
                f"({len(name)} found)"
            )


def _records(
    path: Path, fmt: str, max_column_chars: int | None = None
) -> Iterator[tuple[str, int, dict[str, Any]]]:
    """Header-first record stream: CSV yields its header as the first item; JSONL yields its first
    record's keys as the 'header' so both formats resolve columns the same way. Column names longer than
    max_column_chars (None: no limit) are refused where the header is."""
    if fmt == "csv":
        records = _csv_records(path)
        header = next(records)
        if max_column_chars is not None:
            _check_column_names("header", header[2], max_column_chars)
        yield header
        yield from records
        return
    jsonl_records = _jsonl_records(path)
    first = next(jsonl_records, None)
    if first is None:
        raise FormatError("the file has no records")
    if max_column_chars is not None:
        # Only the first record's keys: they are the columns; later lines are held to them (tabular) or
        # only their text and label keys are read (text).
        _check_column_names(first[0], first[2], max_column_chars)
    yield "header", 0, {key: key for key in first[2]}
    yield first
    yield from jsonl_records


def _label_value(value: Any, where: str, column: str, max_chars: int | None) -> str | None:
    """The label as a string (None when missing); longer than max_chars is refused (None: no limit)."""
    if value is None:
        return None
    if isinstance(value, bool):
        label = "true" if value else "false"
    elif isinstance(value, int):
        # JSON refuses integers of more than 4300 digits before this, so str() is cheap.
        label = str(value)
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise FormatError(f"{where}, column '{column}': label must be finite")
        label = str(int(value)) if value.is_integer() else str(value)
    elif isinstance(value, str):
        label = value.strip()
    else:
        raise FormatError(f"{where}, column '{column}': label must be a string or a number")
    if max_chars is not None and len(label) > max_chars:
        raise FormatError(
            f"{where}, column '{column}': label longer than {max_chars} characters ({len(label)} found)"
        )
    return label or None


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
    path: Path,
    fmt: str,
    text_column: str | None,
    label_column: str | None,
    limits: ArchiveLimits | None = None,
) -> Iterator[tuple[str, str, str | None]]:
    """(where, text, label) for every example; the first item is ('columns', text_col, label_col).

    limits: the upload's limits (column names, label length, text column differing from the label
    column); None when reading a dataset for training, which applies none of them."""
    records = _records(path, fmt, limits.max_column_chars if limits else None)
    _, _, header = next(records)
    text_col = text_column or DEFAULT_TEXT_COLUMN
    if text_col not in header:
        raise FormatError(
            f"text column '{text_col}' not found (columns: {', '.join(header)})", param="text_column"
        )
    label_col = _resolve_label_column(header, label_column)
    if limits is not None and label_col == text_col:
        # Every text would be its own class. When the label column was not asked for, the message says it
        # is the default one, or the client would not see where a second column came from.
        how = "" if label_column is not None else " (the default label column)"
        raise FormatError(
            f"the text and label columns must differ: both are '{text_col}'{how}", param="label_column"
        )
    max_label_chars = limits.max_class_chars if limits else None
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
            label = _label_value(record.get(label_col), where, label_col, max_label_chars)
            if label is None:
                raise FormatError(f"{where}, column '{label_col}': missing label")
        yield where, text, label


def _summarise(
    fmt: str,
    rows: Iterator[tuple[str, Any, str | None]],
    label_col: str | None,
    schema_info: dict[str, Any],
    limits: ArchiveLimits,
) -> DatasetInfo:
    """Count the examples and classes of a validated row stream."""
    counts: Counter[str] = Counter()
    n = 0
    for where, _value, label in rows:
        n += 1
        if label is None:
            continue
        if label not in counts and len(counts) >= limits.max_classes:
            # Refused at the first label past the limit: the counter never holds more than the limit.
            raise FormatError(
                f"more than {limits.max_classes} distinct labels in column '{label_col}': {where} has "
                f"label number {len(counts) + 1}; at most {limits.max_classes} classes are supported",
                param="label_column",
            )
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


def inspect_text(
    path: Path,
    fmt: str,
    text_column: str | None,
    label_column: str | None,
    limits: ArchiveLimits | None = None,
) -> DatasetInfo:
    limits = limits or ArchiveLimits()
    rows = iter_text(path, fmt, text_column, label_column, limits)
    _, text_col, label_col = next(rows)
    characters = 0

    def counted() -> Iterator[tuple[str, str, str | None]]:
        nonlocal characters
        for where, text, label in rows:
            characters += len(text)
            yield where, text, label

    info = _summarise(fmt, counted(), label_col, {"text_column": text_col}, limits)
    # What a job's plan prices a text at (its tokens follow its length).
    info.profile = {"mean_text_chars": round(characters / info.num_examples, 1)}
    return info


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
    if not math.isfinite(number):
        raise FormatError(f"{where}, column '{column}': value must be finite (not NaN or infinity)")
    if abs(number) > MAX_TABLE_MAGNITUDE:
        raise FormatError(
            f"{where}, column '{column}': {number:g} is beyond the largest magnitude a value may have "
            f"({MAX_TABLE_MAGNITUDE:g}); rescale the column (a unit of 10^k, or its logarithm)"
        )
    return number


def iter_tabular(
    path: Path, fmt: str, label_column: str | None, limits: ArchiveLimits | None = None
) -> Iterator[tuple[str, list[float] | list[str], str | None]]:
    """First item: ('columns', feature_columns, label_col); then (where, features, label).

    limits: the upload's limits (column names, label length); None when reading for training."""
    records = _records(path, fmt, limits.max_column_chars if limits else None)
    _, _, header = next(records)
    label_col = _resolve_label_column(header, label_column)
    features = [name for name in header if name != label_col]
    if not features:
        raise FormatError("no feature columns: a tabular dataset needs at least one numeric column")
    if len(features) > MAX_FEATURES:
        raise FormatError(f"{len(features)} feature columns; at most {MAX_FEATURES} are supported")
    max_label_chars = limits.max_class_chars if limits else None
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
            label = _label_value(record.get(label_col), where, label_col, max_label_chars)
            if label is None:
                raise FormatError(f"{where}, column '{label_col}': missing label")
        yield where, values, label


def inspect_tabular(
    path: Path, fmt: str, label_column: str | None, limits: ArchiveLimits | None = None
) -> DatasetInfo:
    limits = limits or ArchiveLimits()
    rows = iter_tabular(path, fmt, label_column, limits)
    _, features, label_col = next(rows)
    return _summarise(fmt, rows, label_col, {"feature_columns": list(features)}, limits)


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
    """Check every member's path, type and size, then work out the layout. Reads no member data.

    Training reads archives through this too (with limits that let everything pass): the checks of
    classes and pixels, which are upload rules, are in inspect_images."""
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
        if info.file_size > RATIO_FLOOR_BYTES and info.file_size > limits.max_compression_ratio * max(
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
    if total > RATIO_FLOOR_BYTES and total > limits.max_compression_ratio * max(total_compressed, 1):
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


def _unreadable(name: str, exc: Exception) -> FormatError:
    return FormatError(f"file '{name}': not a readable image ({type(exc).__name__}: {exc})")


def _open_image(data: bytes, name: str, limits: ArchiveLimits) -> Image.Image:
    """Parse one image's header (Image.open reads no pixel data) and check its format and pixel count."""
    try:
        with warnings.catch_warnings():
            # PIL's own bomb check, also from the header: above Image.MAX_IMAGE_PIXELS (89 M) it only
            # warns (it refuses at twice that); made an error so that it cannot pass silently.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except Exception as exc:
        raise _unreadable(name, exc) from None
    if image.format not in ("PNG", "JPEG"):
        raise FormatError(f"file '{name}': not a PNG or JPEG image (found {image.format})")
    if image.width * image.height > limits.max_image_pixels:
        raise FormatError(
            f"file '{name}': {image.width}x{image.height} pixels is above the limit of "
            f"{limits.max_image_pixels}"
        )
    return image


def image_size(data: bytes, name: str, limits: ArchiveLimits) -> tuple[int, int]:
    """(width, height) of one PNG/JPEG from its header alone, after the format and per-image pixel checks:
    what a caller sums over several images before decoding any of them."""
    return _open_image(data, name, limits).size


def decode_image(data: bytes, name: str, limits: ArchiveLimits, *, draft: bool = False) -> Image.Image:
    """Open and fully decode one PNG/JPEG; FormatError names the file when it is not a readable image."""
    image = _open_image(data, name, limits)
    try:
        if draft and image.format == "JPEG":
            image.draft("RGB", (64, 64))
        image.load()
    except Exception as exc:
        raise _unreadable(name, exc) from None
    return image


def _check_intact(image: Image.Image, name: str) -> None:
    """Refuse a truncated or damaged image without decoding it whole (`image` comes from _open_image)."""
    try:
        if image.format == "PNG":
            # Walks the chunks after the header and checks each one's CRC; pixel data is read but not
            # inflated, so this costs a pass over the file's bytes, not width*height pixels (about 0.2 ms
            # for a 6300x6300 PNG that takes over a second to decode).
            image.verify()
        else:
            # DCT scaling decodes at 1/8 of the size, but every entropy-coded block is still read: a
            # truncated or garbled JPEG fails here at a fraction of a full decode's cost.
            image.draft("RGB", (64, 64))
            image.load()
    except Exception as exc:
        raise _unreadable(name, exc) from None


def _shorten(text: str, chars: int = 60) -> str:
    return text if len(text) <= chars else text[:chars] + "…"


def _check_class_folders(scanned: ImageArchive, limits: ArchiveLimits) -> None:
    """The class folders' names and number, from the member list alone: before any member is read."""
    seen: set[str] = set()
    for _name, label in scanned.entries:
        if label is None or label in seen:
            continue
        folder = f"{scanned.root}{label}/"
        if len(label) > limits.max_class_chars:
            raise FormatError(
                f"folder '{_shorten(folder)}': a class folder name is at most {limits.max_class_chars} "
                f"characters ({len(label)} found)"
            )
        if len(seen) >= limits.max_classes:
            raise FormatError(
                f"more than {limits.max_classes} class folders: '{_shorten(folder)}' is folder number "
                f"{len(seen) + 1}; at most {limits.max_classes} classes are supported"
            )
        seen.add(label)


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


# A network whose input follows the data (resnet-small) reads a dataset's images at their median shorter side,
# between these bounds, rounded to a multiple of 4 (a 16 px digit is read at 16 px, not upsampled to 64: as
# sharp, and 16x less compute).
MIN_SIDE, MAX_SIDE = 16, 128
GREY_MODES = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"}
# Shorter sides further apart than this (largest over smallest) are worth a warning: the images far from the
# median are read at a size far from their own.
WIDE_SIDE_SPREAD = 4.0


@dataclass(frozen=True)
class ImageGeometry:
    """The input a network built for a dataset's images takes."""

    side: int  # height and width, px
    channels: int  # 1 when every image looked at is grey
    stem_stride: int  # how much a resnet-small's stem shrinks it (to about 32 px for its stages)


def geometry_of(median_side: float, grey: bool) -> ImageGeometry:
    side = int(min(MAX_SIDE, max(MIN_SIDE, 4 * round(median_side / 4))))
    stem_stride = 1 if side <= 48 else 2 if side <= 96 else 4
    return ImageGeometry(side=side, channels=1 if grey else 3, stem_stride=stem_stride)


def image_sizes(sides: list[int], grey: bool) -> dict[str, Any]:
    """What an image dataset records of its images' sizes (shown with the dataset, used by job plans): the
    spread of the shorter sides, whether all are grey, and the size a network that follows the data reads
    them at."""
    ordered = sorted(sides)
    median = float(np.median(ordered)) if ordered else 32.0
    geometry = geometry_of(median, grey)
    found: dict[str, Any] = {
        "shorter_side": {"min": ordered[0], "median": median, "max": ordered[-1]} if ordered else None,
        "grey": grey,
        "read_at": geometry.side,
    }
    if ordered and ordered[-1] > WIDE_SIDE_SPREAD * max(ordered[0], 1):
        found["warning"] = (
            f"the images' shorter sides range from {ordered[0]} to {ordered[-1]} px: a network whose input follows "
            f"the data (resnet-small) reads every image at {geometry.side} px, so the largest are scaled "
            f"{ordered[-1] / geometry.side:.0f}x down and the smallest up; resize them to one size, or split "
            "the dataset, if detail at one scale matters"
        )
    return found


def inspect_images(path: Path, limits: ArchiveLimits) -> DatasetInfo:
    with open_archive(path) as archive:
        scanned = scan_archive(archive, limits)
        labeled = scanned.layout == "class_folders"
        classes: list[str] = []
        class_counts: dict[str, int] = {}
        if labeled:
            _check_class_folders(scanned, limits)
            counts = Counter(label for _, label in scanned.entries if label is not None)
            classes, class_counts = _check_classes(counts, None)
        total_pixels = 0
        sides: list[int] = []
        grey = True
        for name, _label in scanned.entries:
            image = _open_image(read_member(archive, name), name, limits)
            # Summed from the header, before this member's integrity check: an archive over the limit is
            # refused at the member that passes it, having only header-checked the members before it.
            total_pixels += image.width * image.height
            sides.append(min(image.size))
            grey = grey and image.mode in GREY_MODES
            if total_pixels > limits.max_archive_pixels:
                raise FormatError(
                    f"file '{name}': with this image the archive holds more than "
                    f"{limits.max_archive_pixels} pixels in all; that is the limit"
                )
            _check_intact(image, name)
    return DatasetInfo(
        format="zip",
        num_examples=len(scanned.entries),
        labeled=labeled,
        classes=classes,
        class_counts=class_counts,
        schema_info={"layout": scanned.layout, "root": scanned.root},
        profile={"image_sizes": image_sizes(sides, grey)},
        # What reading the archive will decode, which the API's cost estimates use.
        pixels=total_pixels,
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
    limits = limits or ArchiveLimits()
    if task == "text_classification":
        return inspect_text(path, fmt, text_column, label_column, limits)
    if task == "tabular_classification":
        if text_column is not None:
            raise FormatError("text_column applies to text_classification datasets only", param="text_column")
        return inspect_tabular(path, fmt, label_column, limits)
    if task == "image_classification":
        if text_column is not None or label_column is not None:
            raise FormatError(
                "image datasets take their labels from folder names; omit text_column and label_column",
                param="label_column" if label_column is not None else "text_column",
            )
        return inspect_images(path, limits)
    raise FormatError(f"unknown task '{task}'", param="task")
