"""Dataset validation and reading (graft/formats.py) on real CSV, JSONL, PNG, JPEG and ZIP bytes.

Every refusal is checked for the FormatError's `param` and for a message that names the row, line or
archive member and the column. Archive tests also check that validation never extracts anything."""

from __future__ import annotations

import io
import json
import os
import re
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image, ImageFile

from graft.formats import (
    RATIO_FLOOR_BYTES,
    ArchiveLimits,
    DatasetInfo,
    FormatError,
    decode_image,
    detect_format,
    image_size,
    inspect_dataset,
    inspect_images,
    inspect_tabular,
    inspect_text,
    read_tabular,
    read_text,
)
from tests.helpers import (
    digit_images,
    digits_zip,
    image_zip,
    iris_csv,
    png_bytes,
    sentiment_rows,
    text_csv,
    text_jsonl,
    write,
)

# ------------------------------------------------------------------------------------ builders

Member = tuple[str | zipfile.ZipInfo, bytes]


def jsonl(*records: Any) -> bytes:
    return "".join(json.dumps(record) + "\n" for record in records).encode()


def gradient(mode: str = "RGB", size: int = 16) -> Image.Image:
    return Image.linear_gradient("L").resize((size, size)).convert(mode)


def image_bytes(mode: str = "RGB", fmt: str = "PNG", size: int = 16) -> bytes:
    return png_bytes(gradient(mode, size), fmt)


def make_zip(members: list[Member], compression: int = zipfile.ZIP_STORED) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compression=compression) as archive:
        for name, data in members:
            archive.writestr(name, data)
    return out.getvalue()


def two_classes() -> list[Member]:
    """A valid labelled set that hostile members are added to."""
    return [("cats/1.png", image_bytes()), ("dogs/2.jpg", image_bytes(fmt="JPEG"))]


def garbage_first() -> list[Member]:
    """A member that fails to decode, listed before anything else: if any image were decoded before the
    whole archive was checked, the error would name this member instead of the hostile one."""
    return [("cats/0.png", b"\x89PNG but not really an image"), *two_classes()]


def member_names(data: bytes) -> list[str]:
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        return [info.filename for info in archive.infolist()]


@pytest.fixture
def upload_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A folder that holds only the uploaded archive. The working directory is moved into tmp_path too, so
    anything an archive tool extracted (to the working directory or next to the archive) would show up."""
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "upload"
    folder.mkdir()
    yield folder
    everything = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    archives = sorted(str(p.relative_to(tmp_path)) for p in folder.glob("*.zip"))
    assert everything == ["upload", *archives], "validation wrote files: archives must never be extracted"


def inspect_zip(folder: Path, data: bytes, limits: ArchiveLimits | None = None) -> DatasetInfo:
    path = write(folder / "images.zip", data)
    info = inspect_images(path, limits or ArchiveLimits())
    assert os.listdir(folder) == ["images.zip"]
    return info


def zip_error(folder: Path, data: bytes, limits: ArchiveLimits | None = None) -> FormatError:
    path = write(folder / "images.zip", data)
    with pytest.raises(FormatError) as caught:
        inspect_images(path, limits or ArchiveLimits())
    assert os.listdir(folder) == ["images.zip"]
    return caught.value


def text_info(
    tmp_path: Path, fmt: str, data: bytes, text_column: str | None = None, label_column: str | None = None
) -> DatasetInfo:
    return inspect_text(write(tmp_path / f"data.{fmt}", data), fmt, text_column, label_column)


def text_error(
    tmp_path: Path, fmt: str, data: bytes, text_column: str | None = None, label_column: str | None = None
) -> FormatError:
    with pytest.raises(FormatError) as caught:
        text_info(tmp_path, fmt, data, text_column, label_column)
    return caught.value


# ------------------------------------------------------------------------------------ text: valid


@pytest.mark.parametrize(("fmt", "build"), [("csv", text_csv), ("jsonl", text_jsonl)])
def test_labelled_text(tmp_path: Path, fmt: str, build: Any) -> None:
    rows = sentiment_rows(11)
    info = text_info(tmp_path, fmt, build(rows))
    assert info.format == fmt
    assert info.num_examples == 11
    assert info.labeled is True
    assert info.classes == ["negative", "positive"]  # sorted, not in order of appearance
    assert info.class_counts == {"negative": 5, "positive": 6}
    assert info.schema_info == {"text_column": "text", "label_column": "label"}

    texts, labels = read_text(tmp_path / f"data.{fmt}", fmt, info.schema_info)
    assert texts == [text for text, _ in rows]
    assert labels == [label for _, label in rows]


@pytest.mark.parametrize(
    ("fmt", "data"),
    [
        (
            "csv",
            text_csv([("great", "pos"), ("awful", "neg"), ("fine", "pos")], header=("body", "sentiment")),
        ),
        (
            "jsonl",
            jsonl(
                {"id": 1, "body": "great", "sentiment": "pos"},
                {"id": 2, "body": "awful", "sentiment": "neg"},
                {"id": 3, "body": "fine", "sentiment": "pos"},
            ),
        ),
    ],
)
def test_custom_text_and_label_columns(tmp_path: Path, fmt: str, data: bytes) -> None:
    info = text_info(tmp_path, fmt, data, text_column="body", label_column="sentiment")
    assert (info.num_examples, info.labeled) == (3, True)
    assert info.classes == ["neg", "pos"]
    assert info.class_counts == {"neg": 1, "pos": 2}
    assert info.schema_info == {"text_column": "body", "label_column": "sentiment"}
    assert read_text(tmp_path / f"data.{fmt}", fmt, info.schema_info) == (
        ["great", "awful", "fine"],
        ["pos", "neg", "pos"],
    )


@pytest.mark.parametrize(
    ("fmt", "data"),
    [
        ("csv", b"text\nfirst review\nsecond review\nthird review\n"),
        ("jsonl", text_jsonl([("first review", None), ("second review", None), ("third review", None)])),
        # Without label_column, a column that is not called 'label' is not a label.
        ("csv", b"text,stars\nfirst review,1\nsecond review,5\nthird review,3\n"),
    ],
)
def test_unlabelled_text(tmp_path: Path, fmt: str, data: bytes) -> None:
    info = text_info(tmp_path, fmt, data)
    assert info.num_examples == 3
    assert info.labeled is False
    assert info.classes == []
    assert info.class_counts == {}
    assert info.schema_info == {"text_column": "text", "label_column": None}
    texts, labels = read_text(tmp_path / f"data.{fmt}", fmt, info.schema_info)
    assert texts == ["first review", "second review", "third review"]
    assert labels is None


@pytest.mark.parametrize(("fmt", "build"), [("csv", text_csv), ("jsonl", text_jsonl)])
def test_utf8_bom_is_accepted(tmp_path: Path, fmt: str, build: Any) -> None:
    rows = [("café crème", "bon"), ("naïve plot", "mauvais")]
    info = text_info(tmp_path, fmt, b"\xef\xbb\xbf" + build(rows))
    assert info.schema_info["text_column"] == "text"  # not '\ufefftext'
    assert info.classes == ["bon", "mauvais"]
    texts, _ = read_text(tmp_path / f"data.{fmt}", fmt, info.schema_info)
    assert texts == ["café crème", "naïve plot"]


def test_csv_quoted_fields_with_newlines_commas_and_quotes(tmp_path: Path) -> None:
    rows = [
        ("first line\nsecond line, with a comma", "a"),
        ('she said "wonderful", twice', "b"),
        ("plain", "a"),
    ]
    data = text_csv(rows)
    assert data.count(b"\n") == 5  # the embedded newline really is in the file
    info = text_info(tmp_path, "csv", data)
    assert info.num_examples == 3
    assert info.class_counts == {"a": 2, "b": 1}
    texts, labels = read_text(tmp_path / "data.csv", "csv", info.schema_info)
    assert texts == [text for text, _ in rows]
    assert labels == ["a", "b", "a"]


def test_csv_row_and_line_numbers_count_embedded_newlines(tmp_path: Path) -> None:
    data = b'text,label\n"two\nlines",a\nok,b\n" ",a\n'
    error = text_error(tmp_path, "csv", data)
    assert "row 3 (line 5), column 'text': empty text" in error.message


@pytest.mark.parametrize(
    ("fmt", "data"),
    [
        ("csv", b"text,label\n\nhello,a\n\n   \nbye,b\r\n\r\nok,a\n\n"),
        (
            "jsonl",
            b'\n{"text": "hello", "label": "a"}\n\n   \n{"text": "bye", "label": "b"}\r\n\t\n{"text": "ok", "label": "a"}\n\n',
        ),
    ],
)
def test_blank_lines_are_skipped(tmp_path: Path, fmt: str, data: bytes) -> None:
    info = text_info(tmp_path, fmt, data)
    assert info.num_examples == 3
    assert info.class_counts == {"a": 2, "b": 1}
    assert read_text(tmp_path / f"data.{fmt}", fmt, info.schema_info)[0] == ["hello", "bye", "ok"]


def test_blank_lines_still_count_in_line_numbers(tmp_path: Path) -> None:
    csv_error = text_error(tmp_path, "csv", b"text,label\n\nhello,a\n\n,b\n")
    assert "row 2 (line 5), column 'text': empty text" in csv_error.message
    jsonl_error = text_error(
        tmp_path, "jsonl", b'{"text": "a", "label": "x"}\n\n\n{"text": "", "label": "y"}\n'
    )
    assert "line 4, column 'text': empty text" in jsonl_error.message


def test_labels_are_normalised_to_strings(tmp_path: Path) -> None:
    data = jsonl(
        {"text": "a", "label": 1},
        {"text": "b", "label": 0},
        {"text": "c", "label": 1.0},
        {"text": "d", "label": " 0 "},
        {"text": "e", "label": 2.5},
    )
    info = text_info(tmp_path, "jsonl", data)
    assert info.classes == ["0", "1", "2.5"]
    assert info.class_counts == {"0": 2, "1": 2, "2.5": 1}


# ------------------------------------------------------------------------------------ text: refused


@pytest.mark.parametrize(
    ("fmt", "data", "columns", "param", "fragments"),
    [
        pytest.param(
            "csv", b"text,label\nhello,a\nbye,b\ncaf\xe9 au lait,a\n", {}, "file",
            ["row 3 (line 4)", "column 'text'", "not valid UTF-8"], id="csv-latin1",
        ),
        pytest.param(
            "csv", b"text,label\nhello,a\nbye,b\n" + b"fine,a\n" * 2000 + b"ok,\xff\n", {}, "file",
            ["row 2003 (line 2004)", "column 'label'", "not valid UTF-8"], id="csv-latin1-late",
        ),
        pytest.param(
            "csv", "text,label\nhello,a\nbye,b\n".encode("utf-16"), {}, "file",
            ["header", "column 1", "not valid UTF-8"], id="csv-utf16",
        ),
        pytest.param(
            "jsonl", b'{"text": "hello", "label": "a"}\n{"text": "caf\xe9", "label": "b"}\n', {}, "file",
            ["line 2", "not valid UTF-8"], id="jsonl-latin1",
        ),
        pytest.param(
            "csv", b"words,label\nhello,a\nbye,b\n", {}, "text_column",
            ["text column 'text' not found", "columns: words, label"], id="csv-no-text-column",
        ),
        pytest.param(
            "jsonl", jsonl({"body": "hello", "label": "a"}, {"body": "bye", "label": "b"}), {}, "text_column",
            ["text column 'text' not found", "columns: body, label"], id="jsonl-no-text-column",
        ),
        pytest.param(
            "csv", b"text,label\nhello,a\nbye,b\n", {"text_column": "body"}, "text_column",
            ["text column 'body' not found", "columns: text, label"], id="named-text-column-absent",
        ),
        pytest.param(
            "csv", b"text,label\nhello,a\nbye,b\n", {"label_column": "sentiment"}, "label_column",
            ["label column 'sentiment' not found", "columns: text, label"], id="csv-label-column-absent",
        ),
        pytest.param(
            "jsonl", jsonl({"text": "hello"}, {"text": "bye"}), {"label_column": "label"}, "label_column",
            ["label column 'label' not found", "columns: text"], id="jsonl-label-column-absent",
        ),
        pytest.param(
            "csv", b"text,label\nhello,a\nbye,b,extra\n", {}, "file",
            ["row 2 (line 3)", "expected 2 fields, found 3"], id="csv-extra-field",
        ),
        pytest.param(
            "csv", b"text,label\nhello,a\nbye,b\nlonely\n", {}, "file",
            ["row 3 (line 4)", "expected 2 fields, found 1"], id="csv-missing-field",
        ),
        pytest.param(
            "csv", b"text,label\nhello,a\n   ,b\n", {}, "file",
            ["row 2 (line 3), column 'text': empty text"], id="csv-empty-text",
        ),
        pytest.param(
            "jsonl", jsonl({"text": "hello", "label": "a"}, {"text": "", "label": "b"}), {}, "file",
            ["line 2, column 'text': empty text"], id="jsonl-empty-text",
        ),
        pytest.param(
            "jsonl", jsonl({"text": "hello", "label": "a"}, {"label": "b"}), {}, "file",
            ["line 2: missing the text column 'text'"], id="jsonl-text-key-absent",
        ),
        pytest.param(
            "csv", b"text,label\nhello,a\nbye,b\nagain,\n", {}, "file",
            ["row 3 (line 4), column 'label': missing label"], id="csv-missing-label",
        ),
        pytest.param(
            "jsonl", jsonl({"text": "hello", "label": "a"}, {"text": "bye"}), {}, "file",
            ["line 2, column 'label': missing label"], id="jsonl-label-key-absent",
        ),
        pytest.param(
            "jsonl", jsonl({"text": "hello", "label": "a"}, {"text": "bye", "label": None}), {}, "file",
            ["line 2, column 'label': missing label"], id="jsonl-null-label",
        ),
        pytest.param(
            "jsonl", jsonl({"text": "hello", "label": "a"}, {"text": "bye", "label": ["b"]}), {}, "file",
            ["line 2, column 'label': label must be a string or a number"], id="jsonl-list-label",
        ),
        pytest.param(
            "jsonl", b'{"text": "hello", "label": 1}\n{"text": "bye", "label": NaN}\n', {}, "file",
            ["line 2, column 'label': label must be finite"], id="jsonl-nan-label",
        ),
        pytest.param(
            "csv", b"text,label\nhello,a\nbye,a\n", {}, "label_column",
            ["label column 'label' has a single class ('a')"], id="csv-single-class",
        ),
        pytest.param(
            "jsonl", jsonl({"t": "hello", "y": "x"}, {"t": "bye", "y": "x"}), {"text_column": "t", "label_column": "y"},
            "label_column", ["label column 'y' has a single class ('x')"], id="jsonl-single-class",
        ),
        pytest.param("csv", b"text,label\n", {}, "file", ["header but no rows"], id="csv-header-only"),
        pytest.param("csv", b"text,label\n\n\n", {}, "file", ["header but no rows"], id="csv-header-blank-lines"),
        pytest.param("csv", b"", {}, "file", ["empty", "header"], id="csv-empty"),
        pytest.param("jsonl", b"", {}, "file", ["no records"], id="jsonl-empty"),
        pytest.param("jsonl", b"\n  \n", {}, "file", ["no records"], id="jsonl-blank"),
        pytest.param(
            "csv", b"text,label,text\nhello,a,x\nbye,b,y\n", {}, "file",
            ["header", "duplicate column name 'text'"], id="csv-duplicate-header",
        ),
        pytest.param(
            "csv", b"text, label ,label\nhello,a,x\nbye,b,y\n", {}, "file",
            ["header", "duplicate column name 'label'"], id="csv-duplicate-after-strip",
        ),
        pytest.param(
            "csv", b"text,,label\nhello,x,a\nbye,y,b\n", {}, "file",
            ["header: column 2 has no name"], id="csv-unnamed-column",
        ),
        pytest.param(
            "csv", b"text,label\nhello,a\nby\x00e,b\n", {}, "file",
            ["row 2 (line 3), column 'text'", "NUL"], id="csv-nul-in-text",
        ),
        pytest.param(
            "csv", b"text,la\x00bel\nhello,a\nbye,b\n", {}, "file",
            ["header, column 2", "NUL"], id="csv-nul-in-header",
        ),
        pytest.param(
            "jsonl", b'{"text": "a", "label": "x"}\n{"text": "b", "label": "y"}\n{"text": "c", "label": \n', {},
            "file", ["line 3: invalid JSON"], id="jsonl-invalid-json",
        ),
        pytest.param(
            "jsonl", b'{"text": "a", "label": "x"}\n["b", "y"]\n', {}, "file",
            ["line 2: expected a JSON object, found list"], id="jsonl-array-line",
        ),
        pytest.param(
            "jsonl", b'"just a string"\n', {}, "file", ["line 1: expected a JSON object, found str"], id="jsonl-string-line",
        ),
        pytest.param(
            "jsonl", jsonl({"text": "a", "label": "x"}, {"text": 5, "label": "y"}), {}, "file",
            ["line 2, column 'text': text must be a string"], id="jsonl-number-text",
        ),
        pytest.param(
            "jsonl", jsonl({"text": "a", "label": "x"}, {"text": None, "label": "y"}), {}, "file",
            ["line 2, column 'text': text must be a string"], id="jsonl-null-text",
        ),
    ],
)  # fmt: skip
def test_malformed_text_is_refused(
    tmp_path: Path, fmt: str, data: bytes, columns: dict[str, str], param: str, fragments: list[str]
) -> None:
    error = text_error(tmp_path, fmt, data, columns.get("text_column"), columns.get("label_column"))
    assert error.param == param
    for fragment in fragments:
        assert fragment in error.message, error.message
    assert str(error) == error.message


def test_read_text_reports_the_same_errors(tmp_path: Path) -> None:
    path = write(tmp_path / "data.csv", b"text,label\nhello,a\n,b\n")
    with pytest.raises(FormatError, match=r"row 2 \(line 3\), column 'text': empty text"):
        read_text(path, "csv", {"text_column": "text", "label_column": "label"})


# ------------------------------------------------------------------------------------ tabular

IRIS_FEATURES = ["sepal_length", "sepal_width", "petal_length", "petal_width"]


def test_iris_csv(tmp_path: Path) -> None:
    path = write(tmp_path / "iris.csv", iris_csv())
    info = inspect_tabular(path, "csv", "species")
    assert info.format == "csv"
    assert info.num_examples == 150
    assert info.labeled is True
    assert info.classes == ["setosa", "versicolor", "virginica"]
    assert info.class_counts == {"setosa": 50, "versicolor": 50, "virginica": 50}
    assert info.schema_info == {"feature_columns": IRIS_FEATURES, "label_column": "species"}
    assert inspect_dataset(path, task="tabular_classification", fmt="csv", label_column="species") == info


def test_tabular_feature_columns_keep_header_order(tmp_path: Path) -> None:
    path = write(tmp_path / "t.csv", b"zeta,label,alpha,mid\n1,a,2,3\n4,b,5,6\n")
    info = inspect_tabular(path, "csv", None)
    assert info.schema_info == {"feature_columns": ["zeta", "alpha", "mid"], "label_column": "label"}
    features, labels = read_tabular(path, "csv", info.schema_info)
    assert features.tolist() == [[1, 2, 3], [4, 5, 6]]
    assert labels == ["a", "b"]


def test_iris_without_label_column_treats_species_as_a_feature(tmp_path: Path) -> None:
    path = write(tmp_path / "iris.csv", iris_csv(10))
    with pytest.raises(FormatError) as caught:
        inspect_tabular(path, "csv", None)
    assert "row 1 (line 2), column 'species'" in caught.value.message
    assert "is not a number" in caught.value.message


def test_read_tabular(tmp_path: Path) -> None:
    data = iris_csv(20)
    path = write(tmp_path / "iris.csv", data)
    info = inspect_tabular(path, "csv", "species")
    features, labels = read_tabular(path, "csv", info.schema_info)
    assert isinstance(features, np.ndarray)
    assert features.dtype == np.float32
    assert features.shape == (20, 4)
    lines = data.decode().splitlines()[1:]
    expected = np.array([[float(v) for v in line.split(",")[:4]] for line in lines], dtype=np.float32)
    np.testing.assert_array_equal(features, expected)
    assert labels == [line.split(",")[4] for line in lines]


def test_tabular_jsonl_and_unlabelled(tmp_path: Path) -> None:
    labelled = write(
        tmp_path / "t.jsonl",
        jsonl(
            {"x": 1, "y": 2.5, "label": "a"},
            {"x": -3, "y": "4", "label": "b"},
            {"x": 0, "y": 1e3, "label": 7},
        ),
    )
    info = inspect_tabular(labelled, "jsonl", None)
    assert (info.format, info.num_examples, info.labeled) == ("jsonl", 3, True)
    assert info.classes == ["7", "a", "b"]
    assert info.schema_info == {"feature_columns": ["x", "y"], "label_column": "label"}
    features, labels = read_tabular(labelled, "jsonl", info.schema_info)
    assert features.dtype == np.float32
    assert features.tolist() == [[1.0, 2.5], [-3.0, 4.0], [0.0, 1000.0]]
    assert labels == ["a", "b", "7"]

    unlabelled = write(tmp_path / "u.csv", b"x,y\n1,2\n3,4\n5,6\n")
    info = inspect_tabular(unlabelled, "csv", None)
    assert (info.num_examples, info.labeled, info.classes, info.class_counts) == (3, False, [], {})
    assert info.schema_info == {"feature_columns": ["x", "y"], "label_column": None}
    features, labels = read_tabular(unlabelled, "csv", info.schema_info)
    assert features.shape == (3, 2) and labels is None


def test_read_tabular_refuses_changed_columns(tmp_path: Path) -> None:
    path = write(tmp_path / "t.csv", b"x,y,label\n1,2,a\n3,4,b\n")
    with pytest.raises(FormatError, match="columns changed"):
        read_tabular(path, "csv", {"feature_columns": ["y", "x"], "label_column": "label"})


@pytest.mark.parametrize(
    ("fmt", "data", "label_column", "param", "fragments"),
    [
        pytest.param(
            "csv", b"a,b,label\n1,2,x\n3,oops,y\n", None, "file",
            ["row 2 (line 3), column 'b': 'oops' is not a number"], id="csv-not-a-number",
        ),
        pytest.param(
            "csv", b"a,b,label\n1,2,x\n3,,y\n", None, "file",
            ["row 2 (line 3), column 'b': missing value"], id="csv-missing-value",
        ),
        pytest.param(
            "csv", b"a,b,label\n1,2,x\n3, ,y\n", None, "file",
            ["row 2 (line 3), column 'b': missing value"], id="csv-blank-value",
        ),
        pytest.param(
            "csv", b"a,b,label\n1,2,x\nnan,4,y\n", None, "file",
            ["row 2 (line 3), column 'a': value must be finite"], id="csv-nan",
        ),
        pytest.param(
            "csv", b"a,b,label\n1,2,x\n3,4,y\n5,inf,x\n", None, "file",
            ["row 3 (line 4), column 'b': value must be finite"], id="csv-inf",
        ),
        pytest.param(
            "csv", b"a,b,label\n1,-Infinity,x\n", None, "file",
            ["row 1 (line 2), column 'b': value must be finite"], id="csv-minus-infinity",
        ),
        pytest.param(
            "csv", b"a,b,label\n1e999,2,x\n", None, "file",
            ["row 1 (line 2), column 'a': value must be finite"], id="csv-overflow",
        ),
        pytest.param(
            "jsonl", b'{"a": 1, "b": 2, "label": "x"}\n{"a": NaN, "b": 2, "label": "y"}\n', None, "file",
            ["line 2, column 'a': value must be finite"], id="jsonl-nan",
        ),
        pytest.param(
            "jsonl", jsonl({"a": 1, "b": 2, "label": "x"}, {"a": 3, "label": "y"}), None, "file",
            ["line 2: missing column 'b'"], id="jsonl-missing-key",
        ),
        pytest.param(
            "jsonl", jsonl({"a": 1, "b": 2, "label": "x"}, {"a": 3, "b": 4, "c": 5, "label": "y"}), None, "file",
            ["line 2: unexpected column 'c'"], id="jsonl-extra-key",
        ),
        pytest.param(
            "jsonl", jsonl({"a": 1, "b": 2, "label": "x"}, {"a": True, "b": 4, "label": "y"}), None, "file",
            ["line 2, column 'a': True is not a number"], id="jsonl-bool",
        ),
        pytest.param(
            "jsonl", jsonl({"a": 1, "b": 2, "label": "x"}, {"a": 3, "b": None, "label": "y"}), None, "file",
            ["line 2, column 'b': missing value"], id="jsonl-null",
        ),
        pytest.param(
            "jsonl", jsonl({"a": 1, "b": 2, "label": "x"}, {"a": [3], "b": 4, "label": "y"}), None, "file",
            ["line 2, column 'a': list is not a number"], id="jsonl-list",
        ),
        pytest.param(
            "csv", b"a,b,label\n1,2,x\n3,4,\n", None, "file",
            ["row 2 (line 3), column 'label': missing label"], id="csv-missing-label",
        ),
        pytest.param(
            "csv", b"a,b,label\n1,2\n", None, "file", ["row 1 (line 2)", "expected 3 fields, found 2"], id="csv-short-row",
        ),
        pytest.param(
            "csv", b"a,b,label\n1,2,x\n3,4,x\n", None, "label_column",
            ["label column 'label' has a single class ('x')"], id="single-class",
        ),
        pytest.param(
            "csv", b"a,b,label\n1,2,x\n3,4,y\n", "species", "label_column",
            ["label column 'species' not found", "columns: a, b, label"], id="label-column-absent",
        ),
        pytest.param(
            "csv", b"label\nx\ny\n", None, "file", ["no feature columns"], id="no-features",
        ),
        pytest.param("csv", b"a,b,label\n", None, "file", ["header but no rows"], id="header-only"),
    ],
)  # fmt: skip
def test_malformed_tabular_is_refused(
    tmp_path: Path, fmt: str, data: bytes, label_column: str | None, param: str, fragments: list[str]
) -> None:
    path = write(tmp_path / f"t.{fmt}", data)
    with pytest.raises(FormatError) as caught:
        inspect_tabular(path, fmt, label_column)
    assert caught.value.param == param
    for fragment in fragments:
        assert fragment in caught.value.message, caught.value.message


# ------------------------------------------------------------------------------------ upload limits: classes, labels, columns


def labelled_rows(fmt: str, task: str, labels: list[Any], tail: bytes = b"") -> bytes:
    """One row per label with the columns of `task` (text: text,label; tabular: x,label); `tail` is
    appended verbatim."""
    column = "text" if task == "text" else "x"
    values = [f"example {i}" if task == "text" else str(i) for i in range(len(labels))]
    if fmt == "csv":
        lines = [
            f"{column},label",
            *(f"{value},{label}" for value, label in zip(values, labels, strict=True)),
        ]
        return ("\n".join(lines) + "\n").encode() + tail
    records = ({column: value, "label": label} for value, label in zip(values, labels, strict=True))
    return jsonl(*records) + tail


def inspect_rows(path: Path, fmt: str, task: str, limits: ArchiveLimits | None = None) -> DatasetInfo:
    if task == "text":
        return inspect_text(path, fmt, None, None, limits)
    return inspect_tabular(path, fmt, None, limits)


ROW_KINDS = [("csv", "text"), ("jsonl", "text"), ("csv", "tabular"), ("jsonl", "tabular")]


@pytest.mark.parametrize(("fmt", "task"), ROW_KINDS)
def test_more_classes_than_the_limit_are_refused_at_the_first_one_past_it(
    tmp_path: Path, fmt: str, task: str
) -> None:
    # A malformed row after label 1001: were the whole file counted first, the error would be about it.
    tail = b"   ,x\n" if fmt == "csv" else b"not json\n"
    path = write(tmp_path / f"d.{fmt}", labelled_rows(fmt, task, [f"class {i}" for i in range(1001)], tail))
    with pytest.raises(FormatError) as caught:
        inspect_rows(path, fmt, task)
    where = "row 1001 (line 1002)" if fmt == "csv" else "line 1001"
    assert caught.value.param == "label_column"
    assert caught.value.message == (
        f"more than 1000 distinct labels in column 'label': {where} has label number 1001; "
        "at most 1000 classes are supported"
    )


@pytest.mark.parametrize(("fmt", "task"), ROW_KINDS)
def test_as_many_classes_as_the_limit_are_accepted(tmp_path: Path, fmt: str, task: str) -> None:
    labels = [f"class {i}" for i in range(1000)] * 2  # repeats are no new classes
    info = inspect_rows(write(tmp_path / f"d.{fmt}", labelled_rows(fmt, task, labels)), fmt, task)
    assert len(info.classes) == 1000
    assert set(info.class_counts.values()) == {2}


def test_the_class_limit_is_configurable(tmp_path: Path) -> None:
    path = write(tmp_path / "d.csv", labelled_rows("csv", "text", ["a", "b", "c"]))
    assert len(inspect_text(path, "csv", None, None, ArchiveLimits(max_classes=3)).classes) == 3
    with pytest.raises(FormatError, match=r"more than 2 distinct labels.*row 3 \(line 4\)"):
        inspect_text(path, "csv", None, None, ArchiveLimits(max_classes=2))


@pytest.mark.parametrize(("fmt", "task"), ROW_KINDS)
def test_long_labels_are_refused_naming_row_and_column(tmp_path: Path, fmt: str, task: str) -> None:
    ok = write(tmp_path / f"ok.{fmt}", labelled_rows(fmt, task, ["a", "b" * 200]))
    assert inspect_rows(ok, fmt, task).classes == ["a", "b" * 200]
    path = write(tmp_path / f"d.{fmt}", labelled_rows(fmt, task, ["a", "b" * 201]))
    with pytest.raises(FormatError) as caught:
        inspect_rows(path, fmt, task)
    where = "row 2 (line 3)" if fmt == "csv" else "line 2"
    assert caught.value.param == "file"
    assert f"{where}, column 'label': label longer than 200 characters (201 found)" in caught.value.message


def test_long_labels_count_what_is_stored(tmp_path: Path) -> None:
    # An integer label is stored as its digits; surrounding spaces are stripped before it is stored.
    digits = write(tmp_path / "d.jsonl", jsonl({"text": "a", "label": 1}, {"text": "b", "label": 10**201}))
    with pytest.raises(FormatError, match="line 2, column 'label': label longer than 200 characters"):
        inspect_text(digits, "jsonl", None, None)
    padded = write(tmp_path / "p.csv", labelled_rows("csv", "text", ["a", " " * 300 + "b" + " " * 300]))
    assert inspect_text(padded, "csv", None, None).classes == ["a", "b"]
    tight = ArchiveLimits(max_class_chars=3)
    with pytest.raises(FormatError, match=r"row 2 \(line 3\), column 'label': label longer than 3"):
        inspect_text(
            write(tmp_path / "t.csv", labelled_rows("csv", "text", ["abc", "abcd"])), "csv", None, None, tight
        )


@pytest.mark.parametrize(
    ("fmt", "task", "data", "where"),
    [
        pytest.param("csv", "text", f"text,{'c' * 201},label\na,1,x\nb,2,y\n".encode(), "header", id="csv-text"),
        pytest.param("csv", "tabular", f"x,{'c' * 201},label\n1,1,x\n2,2,y\n".encode(), "header", id="csv-tabular"),
        pytest.param(
            "jsonl", "text", b"\n" + jsonl({"text": "a", "c" * 201: 1, "label": "x"}, {"text": "b", "label": "y"}),
            "line 2", id="jsonl-text",
        ),
        pytest.param(
            "jsonl", "tabular", jsonl({"x": 1, "c" * 201: 1, "label": "x"}, {"x": 2, "c" * 201: 2, "label": "y"}),
            "line 1", id="jsonl-tabular",
        ),
    ],
)  # fmt: skip
def test_long_column_names_are_refused_naming_the_column(
    tmp_path: Path, fmt: str, task: str, data: bytes, where: str
) -> None:
    path = write(tmp_path / f"d.{fmt}", data)
    with pytest.raises(FormatError) as caught:
        inspect_rows(path, fmt, task)
    assert caught.value.param == "file"
    assert caught.value.message == (
        f"{where}: the name of column 2 is longer than 200 characters (201 found)"
    )
    fits = write(tmp_path / f"fits.{fmt}", data.replace(b"c" * 201, b"c" * 200))
    assert inspect_rows(fits, fmt, task).num_examples == 2


@pytest.mark.parametrize(
    ("fmt", "data", "columns", "fragment"),
    [
        pytest.param(
            "csv", b"body,label\ngreat,a\nawful,b\n", {"text_column": "body", "label_column": "body"},
            "both are 'body'", id="explicit",
        ),
        pytest.param(
            "jsonl", jsonl({"text": "great", "label": "a"}, {"text": "awful", "label": "b"}),
            {"label_column": "text"}, "both are 'text'", id="explicit-default-text-column",
        ),
        pytest.param(
            "csv", b"text,label\ngreat,a\nawful,b\n", {"text_column": "label"},
            "both are 'label' (the default label column)", id="default-label-column",
        ),
    ],
)  # fmt: skip
def test_the_label_column_must_not_be_the_text_column(
    tmp_path: Path, fmt: str, data: bytes, columns: dict[str, str], fragment: str
) -> None:
    error = text_error(tmp_path, fmt, data, columns.get("text_column"), columns.get("label_column"))
    assert error.param == "label_column"
    assert "the text and label columns must differ" in error.message
    assert fragment in error.message
    with pytest.raises(FormatError) as caught:
        inspect_dataset(
            tmp_path / f"data.{fmt}",
            task="text_classification",
            fmt=fmt,
            text_column=columns.get("text_column"),
            label_column=columns.get("label_column"),
        )
    assert caught.value.param == "label_column"


def test_inspect_dataset_applies_the_limits_to_text_and_tabular(tmp_path: Path) -> None:
    strict = ArchiveLimits(max_classes=2, max_class_chars=5, max_column_chars=5)
    text = write(tmp_path / "t.csv", labelled_rows("csv", "text", ["a", "b", "c"]))
    with pytest.raises(FormatError, match="more than 2 distinct labels"):
        inspect_dataset(text, task="text_classification", fmt="csv", limits=strict)
    table = write(tmp_path / "t.jsonl", labelled_rows("jsonl", "tabular", ["a", "abcdef"]))
    with pytest.raises(FormatError, match="line 2, column 'label': label longer than 5"):
        inspect_dataset(table, task="tabular_classification", fmt="jsonl", limits=strict)
    wide = write(tmp_path / "w.csv", b"x,longer,label\n1,2,a\n3,4,b\n")
    with pytest.raises(FormatError, match="header: the name of column 2 is longer than 5"):
        inspect_dataset(wide, task="tabular_classification", fmt="csv", limits=strict)
    # Without limits, the defaults apply.
    with pytest.raises(FormatError, match="more than 1000 distinct labels"):
        inspect_dataset(
            write(tmp_path / "many.csv", labelled_rows("csv", "text", list(range(1001)))),
            task="text_classification",
            fmt="csv",
        )


def test_readers_apply_no_upload_limits(tmp_path: Path) -> None:
    """Datasets accepted before these limits (labels up to 1000 characters, any number of classes, long
    column names, the text column as label) are still read for training."""
    long_column = "c" * 300
    labels = [f"{i:04d}" + "x" * 496 for i in range(1001)]
    rows = [f"example {i},{i},{label}" for i, label in enumerate(labels)]
    text = write(tmp_path / "t.csv", (f"text,{long_column},label\n" + "\n".join(rows) + "\n").encode())
    with pytest.raises(FormatError):
        inspect_text(text, "csv", None, None)
    assert read_text(text, "csv", {"text_column": "text", "label_column": "label"}) == (
        [f"example {i}" for i in range(1001)],
        labels,
    )
    assert read_text(text, "csv", {"text_column": "text", "label_column": "text"})[1] == [
        f"example {i}" for i in range(1001)
    ]
    schema = {"feature_columns": [long_column], "label_column": "label"}
    features, tabular_labels = read_tabular(
        write(
            tmp_path / "f.csv",
            (
                f"{long_column},label\n" + "\n".join(f"{i},{label}" for i, label in enumerate(labels)) + "\n"
            ).encode(),
        ),
        "csv",
        schema,
    )
    assert features.shape == (1001, 1) and tabular_labels == labels


# ------------------------------------------------------------------------------------ images: valid


def test_labelled_png_archive(upload_dir: Path) -> None:
    info = inspect_zip(upload_dir, digits_zip(12))
    assert info.format == "zip"
    assert info.num_examples == 12
    assert info.labeled is True
    assert info.classes == ["one", "zero"]
    assert sum(info.class_counts.values()) == 12 and set(info.class_counts) == {"one", "zero"}
    assert info.schema_info == {"layout": "class_folders", "root": ""}


def test_labelled_jpeg_archive(upload_dir: Path) -> None:
    images = digit_images(10, classes=(3, 7))
    info = inspect_zip(upload_dir, image_zip(images, fmt="JPEG"))
    assert info.num_examples == 10
    assert info.classes == ["3", "7"]
    assert info.class_counts == {
        "3": sum(1 for label, _ in images if label == 3),
        "7": sum(1 for label, _ in images if label == 7),
    }


def test_mixed_extensions_and_case(upload_dir: Path) -> None:
    members: list[Member] = [
        ("cats/a.png", image_bytes()),
        ("cats/b.JPG", image_bytes(fmt="JPEG")),
        ("dogs/c.jpeg", image_bytes(fmt="JPEG")),
        ("dogs/d.PNG", image_bytes("L")),
    ]
    info = inspect_zip(upload_dir, make_zip(members, zipfile.ZIP_DEFLATED))
    assert info.class_counts == {"cats": 2, "dogs": 2}


def test_flat_unlabelled_archive(upload_dir: Path) -> None:
    info = inspect_zip(upload_dir, image_zip([(None, image) for _, image in digit_images(6)]))
    assert info.num_examples == 6
    assert info.labeled is False
    assert info.classes == [] and info.class_counts == {}
    assert info.schema_info == {"layout": "flat", "root": ""}


def test_single_wrapping_folder_is_stripped(upload_dir: Path) -> None:
    members: list[Member] = [
        ("data/", b""),
        ("data/cats/", b""),
        ("data/cats/1.png", image_bytes()),
        ("data/cats/3.png", image_bytes("L")),
        ("data/dogs/", b""),
        ("data/dogs/2.png", image_bytes()),
    ]
    info = inspect_zip(upload_dir, make_zip(members))
    assert info.labeled is True
    assert info.classes == ["cats", "dogs"]
    assert info.class_counts == {"cats": 2, "dogs": 1}
    assert info.schema_info == {"layout": "class_folders", "root": "data/"}


def test_single_folder_of_images_is_a_wrapper_not_a_class(upload_dir: Path) -> None:
    members: list[Member] = [("photos/1.png", image_bytes()), ("photos/2.jpg", image_bytes(fmt="JPEG"))]
    info = inspect_zip(upload_dir, make_zip(members))
    assert (info.labeled, info.num_examples) == (False, 2)
    assert info.schema_info == {"layout": "flat", "root": "photos/"}


def test_junk_members_are_ignored(upload_dir: Path) -> None:
    members: list[Member] = [
        ("__MACOSX/", b""),
        ("__MACOSX/cats/._1.png", b"\x00\x05\x16\x07 resource fork"),
        ("__MACOSX/data/notes.txt", b"not an image"),
        (".DS_Store", b"\x00\x00\x00\x01Bud1"),
        ("cats/.DS_Store", b"\x00\x00\x00\x01Bud1"),
        ("cats/._1.png", b"apple double"),
        ("dogs/Thumbs.db", b"windows"),
        ("dogs/desktop.ini", b"[.ShellClassInfo]"),
        *two_classes(),
    ]
    info = inspect_zip(upload_dir, make_zip(members))
    assert info.num_examples == 2
    assert info.class_counts == {"cats": 1, "dogs": 1}
    assert info.schema_info == {"layout": "class_folders", "root": ""}


@pytest.mark.parametrize(
    ("mode", "fmt"),
    [("RGB", "PNG"), ("RGBA", "PNG"), ("P", "PNG"), ("L", "PNG"), ("LA", "PNG"), ("1", "PNG"),
     ("I;16", "PNG"), ("L", "JPEG"), ("CMYK", "JPEG")],
)  # fmt: skip
def test_image_modes_are_accepted(upload_dir: Path, mode: str, fmt: str) -> None:
    if mode == "I;16":
        image = Image.fromarray(np.arange(256, dtype=np.uint16).reshape(16, 16) * 250)
        data = png_bytes(image)
    else:
        data = image_bytes(mode, fmt)
    assert Image.open(io.BytesIO(data)).mode == mode  # the archive really holds that mode
    suffix = ".png" if fmt == "PNG" else ".jpg"
    members: list[Member] = [(f"odd/image{suffix}", data), ("plain/image.png", image_bytes())]
    info = inspect_zip(upload_dir, make_zip(members))
    assert info.class_counts == {"odd": 1, "plain": 1}


# ------------------------------------------------------------------------------------ images: refused


@pytest.mark.parametrize(
    ("members", "fragments"),
    [
        pytest.param(
            [("cats/1.png", image_bytes()), ("dogs/big/2.png", image_bytes())],
            ["file 'dogs/big/2.png'", "nested folders"], id="nested",
        ),
        pytest.param(
            [("data/cats/1.png", image_bytes()), ("data/dogs/x/2.png", image_bytes())],
            ["file 'data/dogs/x/2.png'", "nested folders"], id="nested-under-wrapper",
        ),
        pytest.param(
            [("1.png", image_bytes()), ("cats/2.png", image_bytes()), ("dogs/3.png", image_bytes())],
            ["file '1.png'", "both at the top level and in class folders"], id="root-and-folders",
        ),
        pytest.param(
            [*two_classes(), ("cats/notes.txt", b"remember the milk")],
            ["file 'cats/notes.txt'", "not an image"], id="text-in-class-folder",
        ),
        pytest.param(
            [("1.png", image_bytes()), ("notes.txt", b"remember the milk")],
            ["file 'notes.txt'", "not an image"], id="text-in-flat-archive",
        ),
        pytest.param(
            [*two_classes(), ("dogs/3.png", image_bytes(size=64)[:80])],
            ["file 'dogs/3.png'", "not a readable image"], id="truncated-png",
        ),
        pytest.param(
            [*two_classes(), ("dogs/3.jpg", image_bytes(fmt="JPEG", size=64)[:200])],
            ["file 'dogs/3.jpg'", "not a readable image"], id="truncated-jpeg",
        ),
        pytest.param(
            [*two_classes(), ("dogs/3.png", np.random.default_rng(0).bytes(4096))],
            ["file 'dogs/3.png'", "not a readable image"], id="random-bytes",
        ),
        pytest.param(
            [*two_classes(), ("dogs/3.png", b"")],
            ["file 'dogs/3.png'", "not a readable image"], id="empty-file",
        ),
        pytest.param(
            [*two_classes(), ("dogs/3.png", image_bytes(fmt="GIF"))],
            ["file 'dogs/3.png'", "not a PNG or JPEG image (found GIF)"], id="gif-named-png",
        ),
        pytest.param(
            [*two_classes(), ("dogs/3.jpg", image_bytes(fmt="BMP"))],
            ["file 'dogs/3.jpg'", "not a PNG or JPEG image (found BMP)"], id="bmp-named-jpg",
        ),
        pytest.param(
            [("data/cats/1.png", image_bytes()), ("data/cats/2.png", image_bytes())],
            ["single class ('cats')", "at least two"], id="single-class",
        ),
        pytest.param([("cats/", b""), ("__MACOSX/._x.png", b"junk")], ["no images"], id="no-images"),
        pytest.param([], ["no images"], id="empty-archive"),
    ],
)  # fmt: skip
def test_bad_image_archives_are_refused(
    upload_dir: Path, members: list[Member], fragments: list[str]
) -> None:
    error = zip_error(upload_dir, make_zip(members))
    assert error.param == "file"
    for fragment in fragments:
        assert fragment in error.message, error.message


def test_image_pixel_limit(upload_dir: Path) -> None:
    members: list[Member] = [("cats/1.png", image_bytes(size=16)), ("dogs/2.png", image_bytes(size=64))]
    error = zip_error(upload_dir, make_zip(members), ArchiveLimits(max_image_pixels=1000))
    assert "file 'dogs/2.png'" in error.message and "64x64 pixels" in error.message


# ------------------------------------------------------------------------------------ images: cost

BIG = 6300  # 6300 * 6300 = 39.69 M pixels: each under the 40 M per-image limit, 26 of them over 1e9


@pytest.fixture(scope="module")
def big_png() -> bytes:
    """A 6300x6300 RGBA PNG of one colour: 159 MB of pixels in about 170 KB (built once: it takes a
    couple of seconds)."""
    return png_bytes(Image.new("RGBA", (BIG, BIG), (10, 200, 30, 255)))


@pytest.fixture(scope="module")
def big_archive(big_png: bytes) -> bytes:
    """The outside test's archive: 60 such PNGs in two class folders, deflated (about 110 KB)."""
    members: list[Member] = [(f"{'cats' if i % 2 else 'dogs'}/{i:02d}.png", big_png) for i in range(60)]
    return make_zip(members, zipfile.ZIP_DEFLATED)


@pytest.fixture
def full_decodes(monkeypatch: pytest.MonkeyPatch) -> list[str | None]:
    """The format of every image PIL decodes: pixel data is only ever decoded in ImageFile.load."""
    decoded: list[str | None] = []
    original = ImageFile.ImageFile.load

    def load(self: ImageFile.ImageFile) -> Any:
        decoded.append(self.format)
        return original(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", load)
    return decoded


def test_the_pixels_of_an_archive_are_bounded_from_the_headers(
    upload_dir: Path, big_archive: bytes, full_decodes: list[str | None]
) -> None:
    assert len(big_archive) < 200 * 1024  # 9.5 G pixels in a small upload
    error = zip_error(upload_dir, big_archive)  # the default limits
    assert error.param == "file"
    twenty_sixth = sorted(member_names(big_archive))[25]  # 26 * 39.69 M > 1e9 >= 25 * 39.69 M
    assert error.message == (
        f"file '{twenty_sixth}': with this image the archive holds more than 1000000000 pixels in all; "
        "that is the limit"
    )
    assert full_decodes == []  # refused without decoding a single image (it used to take about 48 s)


def test_large_images_are_validated_without_decoding_them(
    upload_dir: Path, big_archive: bytes, full_decodes: list[str | None]
) -> None:
    exactly = ArchiveLimits(max_archive_pixels=60 * BIG * BIG)
    info = inspect_zip(upload_dir, big_archive, exactly)
    assert info.num_examples == 60
    assert info.class_counts == {"cats": 30, "dogs": 30}
    assert full_decodes == []  # PNG integrity is checked from chunk CRCs, not by inflating the pixels
    one_short = ArchiveLimits(max_archive_pixels=60 * BIG * BIG - 1)
    last = sorted(member_names(big_archive))[-1]
    assert f"file '{last}': with this image" in zip_error(upload_dir, big_archive, one_short).message


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(lambda data: data[: len(data) // 2], id="cut-in-the-pixel-data"),
        pytest.param(lambda data: data[:-12], id="no-end-chunk"),
        pytest.param(
            lambda data: data[: data.index(b"IDAT") + 100] + bytes([data[data.index(b"IDAT") + 100] ^ 1])
            + data[data.index(b"IDAT") + 101 :],
            id="bit-flipped-pixel-data",
        ),
    ],
)  # fmt: skip
def test_damaged_large_pngs_are_refused_without_decoding(
    upload_dir: Path, big_png: bytes, damage: Any, full_decodes: list[str | None]
) -> None:
    damaged = damage(big_png)
    assert damaged != big_png and Image.open(io.BytesIO(damaged)).size == (BIG, BIG)  # the header is intact
    error = zip_error(upload_dir, make_zip([*two_classes(), ("dogs/big.png", damaged)]))
    assert error.param == "file"
    assert "file 'dogs/big.png': not a readable image" in error.message
    assert full_decodes == ["JPEG"]  # the small JPEG of two_classes(), at 1/8 scale; no PNG


def test_jpegs_are_still_checked_by_a_scaled_decode(upload_dir: Path) -> None:
    jpeg = image_bytes(fmt="JPEG", size=256)
    garbled = jpeg[:-600] + bytes(600)  # the header is intact, the last rows of blocks are zeros
    members: list[Member] = [*two_classes(), ("dogs/3.jpg", garbled)]
    error = zip_error(upload_dir, make_zip(members))
    assert "file 'dogs/3.jpg': not a readable image" in error.message


def test_image_size_reads_only_the_header(big_png: bytes, full_decodes: list[str | None]) -> None:
    limits = ArchiveLimits()
    assert image_size(big_png, "big.png", limits) == (BIG, BIG)
    assert image_size(image_bytes(fmt="JPEG", size=24), "a.jpg", limits) == (24, 24)
    assert full_decodes == []
    with pytest.raises(
        FormatError, match=re.escape("file 'big.png': 6300x6300 pixels is above the limit of 1000")
    ):
        image_size(big_png, "big.png", ArchiveLimits(max_image_pixels=1000))
    with pytest.raises(FormatError, match=re.escape("file 'a.gif': not a PNG or JPEG image (found GIF)")):
        image_size(image_bytes(fmt="GIF"), "a.gif", limits)
    with pytest.raises(FormatError, match=re.escape("file 'x.png': not a readable image")):
        image_size(b"\x89PNG but not really an image", "x.png", limits)


def test_decode_image_still_decodes(full_decodes: list[str | None]) -> None:
    image = decode_image(image_bytes("L", size=20), "a.png", ArchiveLimits())
    assert full_decodes == ["PNG"]
    assert (image.size, image.mode) == ((20, 20), "L")
    assert np.asarray(image).std() > 0  # the pixels themselves, not only the header
    with pytest.raises(FormatError, match=re.escape("file 'cut.png': not a readable image")):
        decode_image(image_bytes(size=64)[:-40], "cut.png", ArchiveLimits())


def test_more_class_folders_than_the_limit_are_refused_before_reading_images(upload_dir: Path) -> None:
    # The members are not images: the folders alone decide, before any member is read.
    members: list[Member] = [(f"c{i:04d}/1.png", b"never read") for i in range(1001)]
    error = zip_error(upload_dir, make_zip(members))
    assert error.param == "file"
    assert error.message == (
        "more than 1000 class folders: 'c1000/' is folder number 1001; at most 1000 classes are supported"
    )
    three: list[Member] = [*two_classes(), ("birds/3.png", image_bytes())]
    assert len(inspect_zip(upload_dir, make_zip(three), ArchiveLimits(max_classes=3)).classes) == 3
    wrapped = zip_error(
        upload_dir, make_zip([(f"data/{name}", data) for name, data in three]), ArchiveLimits(max_classes=2)
    )
    assert "more than 2 class folders: 'data/dogs/' is folder number 3" in wrapped.message


def test_long_class_folder_names_are_refused(upload_dir: Path) -> None:
    fits: list[Member] = [("cats/1.png", image_bytes()), (f"{'d' * 200}/2.png", image_bytes())]
    assert inspect_zip(upload_dir, make_zip(fits)).classes == ["cats", "d" * 200]
    members: list[Member] = [("cats/1.png", image_bytes()), (f"{'d' * 201}/2.png", b"never read")]
    error = zip_error(upload_dir, make_zip(members))
    assert error.param == "file"
    assert error.message == (
        f"folder '{'d' * 60}…': a class folder name is at most 200 characters (201 found)"
    )


# ------------------------------------------------------------------------------------ hostile archives


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("../evil.png", "'..' in path"),
        ("cats/../../evil.png", "'..' in path"),
        ("/etc/x.png", "absolute path"),
        ("C:/Windows/x.png", "absolute path"),
        ("\\evil.png", "absolute path"),
        ("cats\\evil.png", "backslash in path"),
        ("..\\..\\evil.png", "backslash in path"),
    ],
)
def test_unsafe_paths_are_refused_before_decoding(upload_dir: Path, name: str, reason: str) -> None:
    data = make_zip([*garbage_first(), (name, image_bytes())])
    assert member_names(data)[-1] == name  # zipfile kept the hostile name as written
    error = zip_error(upload_dir, data)
    assert error.param == "file"
    assert f"file '{name}': {reason} is not allowed" in error.message
    assert not (upload_dir.parent.parent / "evil.png").exists()


@pytest.mark.parametrize(
    ("mode", "reason"),
    [(0o120777, "symbolic link"), (0o010644, "special file"), (0o060644, "special file")],
)
def test_links_and_special_files_are_refused_before_decoding(
    upload_dir: Path, mode: int, reason: str
) -> None:
    member = zipfile.ZipInfo("dogs/link.png")
    member.create_system = 3  # Unix
    member.external_attr = mode << 16
    data = make_zip([*garbage_first(), (member, b"../../../etc/passwd")])
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        assert archive.getinfo("dogs/link.png").external_attr >> 16 == mode
    error = zip_error(upload_dir, data)
    assert f"file 'dogs/link.png': {reason} is not allowed" in error.message


def test_encrypted_members_are_refused_before_decoding(upload_dir: Path) -> None:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as archive:
        for name, data in garbage_first():
            archive.writestr(name, data)
        archive.writestr("dogs/secret.png", image_bytes())
        secret = archive.getinfo("dogs/secret.png")
        secret.flag_bits |= 0x1  # written to the central directory on close
    raw = bytearray(out.getvalue())
    flags = secret.header_offset + 6  # and to the local header, as an encrypting archiver would
    raw[flags] |= 0x1
    with zipfile.ZipFile(io.BytesIO(bytes(raw))) as archive:
        assert archive.getinfo("dogs/secret.png").flag_bits & 0x1
        assert not archive.getinfo("cats/1.png").flag_bits & 0x1
    error = zip_error(upload_dir, bytes(raw))
    assert "file 'dogs/secret.png': encrypted member is not allowed" in error.message


def zero_member(name: str, size: int) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for member, data in garbage_first():
            archive.writestr(member, data)
        with archive.open(name, "w") as handle:
            chunk = bytes(1024 * 1024)
            for _ in range(size // len(chunk)):
                handle.write(chunk)
    return out.getvalue()


@pytest.mark.parametrize("megabytes", [4, 50])
def test_a_highly_compressed_member_is_a_zip_bomb(upload_dir: Path, megabytes: int) -> None:
    data = zero_member("dogs/bomb.png", megabytes * 1024 * 1024)
    assert len(data) < 100 * 1024  # megabytes of zeros in a few KB
    error = zip_error(upload_dir, data)  # the default limits
    assert error.param == "file"
    assert "file 'dogs/bomb.png': compression ratio above 200" in error.message


def test_compression_ratio_limit_is_configurable(upload_dir: Path) -> None:
    # 2 MiB of text that deflates about 10:1 passes the default ratio of 200, not a ratio of 5.
    rng = np.random.default_rng(1)
    text = " ".join(rng.choice(["alpha", "beta", "gamma", "delta"], size=420_000)).encode()[: 2 * 1024 * 1024]
    data = make_zip([*two_classes(), ("dogs/text.png", text)], zipfile.ZIP_DEFLATED)
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        info = archive.getinfo("dogs/text.png")
        assert 5 < info.file_size / info.compress_size < 200
    assert "not a readable image" in zip_error(upload_dir, data).message
    strict = zip_error(upload_dir, data, ArchiveLimits(max_compression_ratio=5))
    assert "file 'dogs/text.png': compression ratio above 5" in strict.message


def test_many_small_compressed_members_are_a_zip_bomb(upload_dir: Path) -> None:
    # Each member is 32 KiB, under the per-member floor; together they expand 1.25 MiB from a few KB, and
    # the whole archive's ratio is checked at that size too (it used to be only above 10 MiB).
    members: list[Member] = [*garbage_first(), *((f"dogs/{i}.png", bytes(32 * 1024)) for i in range(40))]
    error = zip_error(upload_dir, make_zip(members, zipfile.ZIP_DEFLATED))
    assert "the archive's compression ratio is above 200" in error.message


def test_a_small_highly_compressed_member_is_a_zip_bomb(upload_dir: Path) -> None:
    # 512 KiB of zeros: below the old 1 MiB threshold, it used to reach the decoder.
    members: list[Member] = [*garbage_first(), ("dogs/bomb.png", bytes(512 * 1024))]
    error = zip_error(upload_dir, make_zip(members, zipfile.ZIP_DEFLATED))
    assert error.message == "file 'dogs/bomb.png': compression ratio above 200 (a zip bomb?)"


def test_a_small_macos_archive_passes_the_ratio_checks(upload_dir: Path) -> None:
    """What zipping a folder in the Finder makes: 40 tiny PNGs, a .DS_Store and a resource fork per image,
    the last two mostly zeros. Each of those compresses far beyond 200:1, but below the floor a member's
    ratio is not judged; the whole archive's is, and it is modest."""
    names = [(f"{'cats' if i % 2 else 'dogs'}", f"{i}.png") for i in range(40)]
    images: list[Member] = [
        (f"{folder}/{file}", image_bytes(size=4 + i % 5)) for i, (folder, file) in enumerate(names)
    ]
    junk: list[Member] = [
        ("cats/.DS_Store", bytes(6148)),
        ("dogs/.DS_Store", b"\x00\x00\x00\x01Bud1" + bytes(10234)),
    ]
    forks: list[Member] = [(f"__MACOSX/{folder}/._{file}", bytes(4096)) for folder, file in names]
    data = make_zip([*images, *junk, *forks], zipfile.ZIP_DEFLATED)
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        infos = archive.infolist()
        store = archive.getinfo("cats/.DS_Store")
        assert store.file_size > 200 * store.compress_size  # only the floor lets this member pass
        total = sum(info.file_size for info in infos)
        assert total > RATIO_FLOOR_BYTES  # so the whole archive's ratio is checked
        assert total < 200 * sum(info.compress_size for info in infos)
    info = inspect_zip(upload_dir, data)
    assert info.num_examples == 40
    assert info.class_counts == {"cats": 20, "dogs": 20}


def test_total_uncompressed_size_limit(upload_dir: Path) -> None:
    rng = np.random.default_rng(2)
    members: list[Member] = [(f"cats/{i}.png", rng.bytes(1000)) for i in range(3)]
    error = zip_error(upload_dir, make_zip(members), ArchiveLimits(max_uncompressed_bytes=2500))
    assert error.param == "file"
    assert "expands to more than 2500 bytes" in error.message


def test_member_count_limit(upload_dir: Path) -> None:
    tiny = image_bytes(size=4)
    ten: list[Member] = [(f"{'cats' if i % 2 else 'dogs'}/{i}.png", tiny) for i in range(10)]
    assert inspect_zip(upload_dir, make_zip(ten), ArchiveLimits(max_members=10)).num_examples == 10
    eleven = make_zip([("cats/0.png", b"never decoded"), *ten])
    error = zip_error(upload_dir, eleven, ArchiveLimits(max_members=10))
    assert error.param == "file"
    assert "11 members; at most 10" in error.message


def test_duplicate_member_names(upload_dir: Path) -> None:
    with pytest.warns(UserWarning, match="Duplicate name"):
        data = make_zip([*two_classes(), ("cats/1.png", image_bytes("L"))])
    assert member_names(data).count("cats/1.png") == 2
    error = zip_error(upload_dir, data)
    assert error.param == "file"
    assert "file 'cats/1.png' appears twice" in error.message


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"this is not a zip archive at all", id="text"),
        pytest.param(png_bytes(gradient()), id="png"),
        pytest.param(make_zip(two_classes())[:-30], id="truncated-zip"),
    ],
)
def test_not_a_zip(upload_dir: Path, data: bytes) -> None:
    error = zip_error(upload_dir, data)
    assert error.param == "file"
    assert "not a valid ZIP archive" in error.message


def test_a_non_zip_named_zip_is_caught_by_detect_format() -> None:
    with pytest.raises(FormatError) as caught:
        detect_format("images.zip", b"this is not a zip archive at all")
    assert caught.value.param == "file"
    assert "'images.zip' is named .zip but is not a ZIP archive" in caught.value.message


# ------------------------------------------------------------------------------------ detect_format

ZIP_HEAD = make_zip(two_classes())[:64]


@pytest.mark.parametrize(
    ("filename", "head", "expected"),
    [
        ("reviews.csv", b"text,label\nhello,a\n", "csv"),
        ("REVIEWS.CSV", b"text,label\n", "csv"),
        ("reviews.csv", b'{"text": "a csv suffix wins"}\n', "csv"),
        ("reviews.jsonl", b'{"text": "hello"}\n', "jsonl"),
        ("reviews.ndjson", b'{"text": "hello"}\n', "jsonl"),
        pytest.param("images.zip", ZIP_HEAD, "zip", id="zip"),
        pytest.param("images.ZIP", b"PK\x05\x06" + bytes(18), "zip", id="empty-zip-upper-suffix"),
        pytest.param("images", ZIP_HEAD, "zip", id="zip-no-suffix"),
        ("reviews", b'{"text": "hello"}\n', "jsonl"),
        (None, b'\xef\xbb\xbf \n {"text": "hello"}\n', "jsonl"),
        ("reviews", b"text,label\nhello,a\n", "csv"),
        ("reviews.txt", b'{"text": "hello"}\n', "jsonl"),
        ("reviews.txt", b"text,label\n", "csv"),
    ],
)
def test_detect_format(filename: str | None, head: bytes, expected: str) -> None:
    assert detect_format(filename, head) == expected


@pytest.mark.parametrize(
    ("filename", "head", "fragment"),
    [
        pytest.param(
            "images.csv", ZIP_HEAD, "'images.csv' is a ZIP archive; name it .zip", id="zip-named-csv"
        ),
        pytest.param(
            "images.jsonl", ZIP_HEAD, "'images.jsonl' is a ZIP archive; name it .zip", id="zip-named-jsonl"
        ),
        ("book.xlsx", b"text,label\nhello,a\n", "unsupported file type '.xlsx'"),
        # An .xlsx is a ZIP too: it is an unsupported type, not a misnamed image archive.
        pytest.param("book.xlsx", ZIP_HEAD, "unsupported file type '.xlsx'", id="xlsx-zip-bytes"),
        pytest.param("photo.png", png_bytes(gradient()), "unsupported file type '.png'", id="png"),
        ("images.zip", b"text,label\n", "'images.zip' is named .zip but is not a ZIP archive"),
    ],
)
def test_detect_format_refusals(filename: str, head: bytes, fragment: str) -> None:
    with pytest.raises(FormatError) as caught:
        detect_format(filename, head)
    assert caught.value.param == "file"
    assert fragment in caught.value.message


# ------------------------------------------------------------------------------------ inspect_dataset


def test_inspect_dataset_dispatches_on_task(tmp_path: Path) -> None:
    text = write(tmp_path / "t.csv", text_csv(sentiment_rows(4)))
    assert inspect_dataset(text, task="text_classification", fmt="csv").classes == ["negative", "positive"]
    table = write(tmp_path / "t.jsonl", jsonl({"x": 1, "label": "a"}, {"x": 2, "label": "b"}))
    assert inspect_dataset(table, task="tabular_classification", fmt="jsonl").schema_info == {
        "feature_columns": ["x"],
        "label_column": "label",
    }
    images = write(tmp_path / "images.zip", digits_zip(6))
    assert inspect_dataset(images, task="image_classification", fmt="zip").classes == ["one", "zero"]
    # The limits passed in are the ones applied.
    with pytest.raises(FormatError, match="6 members; at most 3"):
        inspect_dataset(images, task="image_classification", fmt="zip", limits=ArchiveLimits(max_members=3))
    assert sorted(os.listdir(tmp_path)) == ["images.zip", "t.csv", "t.jsonl"]


@pytest.mark.parametrize(
    ("task", "fmt", "columns", "param", "fragment"),
    [
        ("text_classification", "zip", {}, "file", "text_classification datasets are uploaded as csv or jsonl, not zip"),
        ("tabular_classification", "zip", {}, "file", "uploaded as csv or jsonl, not zip"),
        ("image_classification", "csv", {}, "file", "image_classification datasets are uploaded as zip, not csv"),
        ("image_classification", "jsonl", {}, "file", "uploaded as zip, not jsonl"),
        ("tabular_classification", "csv", {"text_column": "text"}, "text_column", "text_column applies to text_classification"),
        ("image_classification", "zip", {"label_column": "label"}, "label_column", "labels from folder names"),
        ("image_classification", "zip", {"text_column": "text"}, "text_column", "labels from folder names"),
        ("speech_recognition", "csv", {}, "task", "unknown task 'speech_recognition'"),
    ],
)  # fmt: skip
def test_inspect_dataset_refusals(
    tmp_path: Path, task: str, fmt: str, columns: dict[str, str], param: str, fragment: str
) -> None:
    data = digits_zip(4) if fmt == "zip" else b"x,label\n1,a\n2,b\n"
    path = write(tmp_path / f"data.{fmt}", data)
    with pytest.raises(FormatError) as caught:
        inspect_dataset(
            path,
            task=task,
            fmt=fmt,
            text_column=columns.get("text_column"),
            label_column=columns.get("label_column"),
        )
    assert caught.value.param == param
    assert fragment in caught.value.message
    assert sorted(os.listdir(tmp_path)) == [f"data.{fmt}"]
