"""Dataset validation and reading (app/datasets/formats.py) on real CSV, JSONL, PNG, JPEG and ZIP bytes.

Every refusal is checked for the FormatError's `param` and for a message that names the row, line or
archive member and the column. Archive tests also check that validation never extracts anything."""

from __future__ import annotations

import io
import json
import os
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from app.datasets.formats import (
    ArchiveLimits,
    DatasetInfo,
    FormatError,
    detect_format,
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
    # Each member is 1 MiB, under the per-member threshold; together they expand 12 MiB from a few KB.
    members: list[Member] = [*garbage_first(), *((f"dogs/{i}.png", bytes(1024 * 1024)) for i in range(12))]
    error = zip_error(upload_dir, make_zip(members, zipfile.ZIP_DEFLATED))
    assert "the archive's compression ratio is above 200" in error.message


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
