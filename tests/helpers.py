"""Test data made on the fly (nothing is stored in the repository) and small HTTP helpers."""

from __future__ import annotations

import csv
import io
import json
import random
import signal
import socket
import subprocess
import time
import zipfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

POSITIVE = [
    "a wonderful film", "I loved every minute", "brilliant acting and a great story", "truly delightful",
    "an excellent movie", "fantastic and moving", "great fun for everyone", "superb direction",
    "a joy to watch", "beautifully made", "the best film this year", "charming and warm",
]  # fmt: skip
NEGATIVE = [
    "a terrible film", "I hated every minute", "awful acting and a dull story", "truly boring",
    "a dreadful movie", "bad and tedious", "a waste of time", "poor direction",
    "painful to watch", "badly made", "the worst film this year", "cold and lifeless",
]  # fmt: skip
FILLERS = ["", " indeed", " really", " overall", " to be honest", " in my opinion"]


def sentiment_rows(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """n labelled review snippets, alternating positive and negative."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = "positive" if i % 2 == 0 else "negative"
        phrase = rng.choice(POSITIVE if label == "positive" else NEGATIVE)
        rows.append((phrase + rng.choice(FILLERS), label))
    return rows


def text_csv(rows: Iterable[tuple[str, str]], header: tuple[str, str] = ("text", "label")) -> bytes:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(header)
    writer.writerows(rows)
    return out.getvalue().encode()


def text_jsonl(rows: Iterable[tuple[str, str | None]]) -> bytes:
    lines = []
    for text, label in rows:
        record: dict[str, Any] = {"text": text}
        if label is not None:
            record["label"] = label
        lines.append(json.dumps(record))
    return ("\n".join(lines) + "\n").encode()


def iris_csv(n: int | None = None, seed: int = 0) -> bytes:
    from sklearn.datasets import load_iris

    data = load_iris()
    order = np.random.default_rng(seed).permutation(len(data.target))[: n or len(data.target)]
    out = io.StringIO()
    writer = csv.writer(out)
    columns = ["sepal_length", "sepal_width", "petal_length", "petal_width"]
    writer.writerow([*columns, "species"])
    for i in order:
        writer.writerow([*(f"{v:.1f}" for v in data.data[i]), data.target_names[data.target[i]]])
    return out.getvalue().encode()


def digit_images(
    n: int, classes: Iterable[int] = (0, 1), seed: int = 0, offset: int = 0
) -> list[tuple[int, Image.Image]]:
    """Real handwritten digits (scikit-learn's 8x8 set), upscaled to 32x32 greyscale images. The same seed
    with different offsets gives disjoint sets."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    wanted = list(classes)
    rng = np.random.default_rng(seed)
    picks = [i for i in rng.permutation(len(digits.target)) if digits.target[i] in wanted][
        offset : offset + n
    ]
    images = []
    for i in picks:
        pixels = (digits.images[i] * (255.0 / 16.0)).astype(np.uint8)
        images.append((int(digits.target[i]), Image.fromarray(pixels, mode="L").resize((32, 32))))
    return images


def png_bytes(image: Image.Image, fmt: str = "PNG") -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt)
    return out.getvalue()


def image_zip(
    images: Iterable[tuple[int | str | None, Image.Image]], *, root: str = "", fmt: str = "PNG"
) -> bytes:
    """A ZIP with one folder per class (labelled) or images at the root (label None)."""
    out = io.BytesIO()
    suffix = ".png" if fmt == "PNG" else ".jpg"
    with zipfile.ZipFile(out, "w") as archive:
        for i, (label, image) in enumerate(images):
            folder = f"{label}/" if label is not None else ""
            archive.writestr(f"{root}{folder}img_{i:04d}{suffix}", png_bytes(image, fmt))
    return out.getvalue()


DIGIT_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def digits_zip(n: int = 40, classes: Iterable[int] = (0, 1), seed: int = 0, offset: int = 0) -> bytes:
    return image_zip([(DIGIT_NAMES[label], image) for label, image in digit_images(n, classes, seed, offset)])


def digits_table_csv(classes: Iterable[int], count: int, offset: int = 0) -> bytes:
    """scikit-learn's handwritten digits as a table: 64 pixel columns and a `digit` label, `count` examples
    of `classes` from `offset` on, in a fixed shuffled order (disjoint ranges give disjoint examples)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    wanted = set(classes)
    picks = [
        i for i in np.random.default_rng(1).permutation(len(digits.target)) if digits.target[i] in wanted
    ]
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow([f"p{i}" for i in range(64)] + ["digit"])
    for i in picks[offset : offset + count]:
        writer.writerow([int(v) for v in digits.data[i]] + [int(digits.target[i])])
    return out.getvalue().encode()


def unlabelled_csv(table: bytes) -> bytes:
    """The same CSV rows without their last column (the label)."""
    return b"\n".join(b",".join(line.split(b",")[:-1]) for line in table.strip().split(b"\n")) + b"\n"


def shifted_table_csv(
    n: int, *, domain: str, seed: int = 0, wrong_labels: bool = False, with_labels: bool = True
) -> bytes:
    """A two-class table with a planted domain shift. Column x0 carries the label in both domains (weakly);
    x1 tracks the label tightly in the source domain and is unrelated, shifted noise in the target domain, so
    a model trained on the source alone leans on x1 and fails on the target. x2..x7 are noise. With
    `wrong_labels` the label column is inverted (a target whose labels must never be read); without
    `with_labels` there is no label column."""
    rng = np.random.default_rng(seed + (0 if domain == "source" else 1000))
    y = rng.integers(0, 2, n)
    sign = 2 * y - 1
    x0 = 1.5 * sign + rng.normal(0, 1.0, n)
    x1 = 2.0 * sign + rng.normal(0, 0.3, n) if domain == "source" else rng.normal(3.0, 0.5, n)
    noise = rng.normal(0, 1, (n, 6))
    labels = np.where(y == 1, "pos", "neg")
    if wrong_labels:
        labels = np.where(y == 1, "neg", "pos")
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["x0", "x1", *[f"x{i}" for i in range(2, 8)], *(["label"] if with_labels else [])])
    for i in range(n):
        label = [labels[i]] if with_labels else []
        writer.writerow([f"{x0[i]:.4f}", f"{x1[i]:.4f}", *[f"{v:.4f}" for v in noise[i]], *label])
    return out.getvalue().encode()


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def wait_for(predicate: Callable[[], Any], timeout: float, interval: float = 0.25, message: str = "") -> Any:
    """Poll until `predicate` returns something truthy; fail the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {message or predicate}")
        time.sleep(interval)


class Api:
    """An HTTP client (TestClient or httpx.Client) that sends one API key with every request."""

    def __init__(self, http: Any, key: str, project_id: str | None = None) -> None:
        self.http = http
        self.key = key
        self.project_id = project_id

    def _headers(self, headers: dict[str, str] | None) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}", **(headers or {})}

    def get(self, url: str, **kwargs: Any) -> Any:
        return self.http.get(url, headers=self._headers(kwargs.pop("headers", None)), **kwargs)

    def post(self, url: str, **kwargs: Any) -> Any:
        return self.http.post(url, headers=self._headers(kwargs.pop("headers", None)), **kwargs)

    def delete(self, url: str, **kwargs: Any) -> Any:
        return self.http.delete(url, headers=self._headers(kwargs.pop("headers", None)), **kwargs)

    def upload(self, data: bytes, filename: str, task: str, **fields: str) -> Any:
        return self.post("/v1/datasets", files={"file": (filename, data)}, data={"task": task, **fields})

    def upload_ok(self, data: bytes, filename: str, task: str, **fields: str) -> dict[str, Any]:
        response = self.upload(data, filename, task, **fields)
        assert response.status_code == 201, response.text
        return response.json()  # type: ignore[no-any-return]

    def create_job(self, body: dict[str, Any], **kwargs: Any) -> Any:
        return self.post("/v1/jobs", json={"type": "finetune", **body}, **kwargs)

    def wait_job(
        self,
        job_id: str,
        statuses: tuple[str, ...] = ("succeeded", "failed", "cancelled"),
        timeout: float = 180,
    ) -> dict[str, Any]:
        def done() -> dict[str, Any] | None:
            job = self.get(f"/v1/jobs/{job_id}").json()
            return job if job["status"] in statuses else None

        return wait_for(done, timeout, interval=0.5, message=f"job {job_id} to reach {statuses}")  # type: ignore[no-any-return]


def new_project(admin: Api, name: str = "test") -> Api:
    """A fresh project with a member key: each test works in a project of its own."""
    project = admin.post("/v1/projects", json={"name": name})
    assert project.status_code == 201, project.text
    key = admin.post(f"/v1/projects/{project.json()['id']}/api_keys", json={"name": "test"})
    assert key.status_code == 201, key.text
    return Api(admin.http, key.json()["key"], project.json()["id"])


# A second domain of short texts: product reviews in a shop's comment box, with their own vocabulary of
# praise and complaint (phrases, not the film domain's adjectives), informal spelling and mixed verdicts.
_PRODUCTS = [
    "the kettle", "this blender", "the charger", "these headphones", "the backpack", "this lamp",
    "the phone case", "the vacuum", "this mattress", "the coffee grinder", "the jacket", "these boots",
    "the router", "this keyboard", "the frying pan", "the office chair",
]  # fmt: skip
_PRODUCT_GOOD = [
    "works perfectly", "arrived a day early", "feels really sturdy", "is great value for money",
    "does exactly what it says", "still going strong after months", "was easy to set up", "is worth every penny",
    "exceeded my expectations", "fits perfectly", "is well made", "charges super fast",
]  # fmt: skip
_PRODUCT_BAD = [
    "broke after a week", "arrived damaged", "feels flimsy", "is overpriced", "stopped working",
    "is a waste of money", "was missing parts", "fell apart", "does not fit at all", "is badly made",
    "died after two days", "smells of cheap plastic",
]  # fmt: skip
_PRODUCT_TEMPLATES = [
    "{P} {a}",
    "{P} {a} {e}",
    "ordered {p} last month and it {a}",
    "{P} {a}, and the box {a2}",
    "would not buy again, {p} {a}" ,
    "five stars, {p} {a}",
    "one star. {P} {a}",
    "my partner says {p} {o}, but for me it {a}",
    "{P} {a}. delivery was slow though",
    "returned it: {p} {a}",
]  # fmt: skip
_VERDICT_TEMPLATES = {
    "positive": {"five stars, {p} {a}"},
    "negative": {"would not buy again, {p} {a}", "one star. {P} {a}", "returned it: {p} {a}"},
}
_EMOJI = ["", "", " :)", " :(", " !!", " lol", " tbh", " 10/10", " meh"]


def opposite_label(label: str) -> str:
    return "negative" if label == "positive" else "positive"


def product_rows(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """n product-review sentences, alternating positive and negative; the verdict words are the second
    domain's own ("broke after a week", "worth every penny"), and templates that state a fixed verdict
    ("five stars", "one star", "would not buy again", "returned it") agree with the label."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = "positive" if i % 2 == 0 else "negative"
        same, opposite = (
            (_PRODUCT_GOOD, _PRODUCT_BAD) if label == "positive" else (_PRODUCT_BAD, _PRODUCT_GOOD)
        )
        # A template that states a verdict is never used for the other label.
        templates = [t for t in _PRODUCT_TEMPLATES if t not in _VERDICT_TEMPLATES[opposite_label(label)]]
        product = rng.choice(_PRODUCTS)
        text = rng.choice(templates).format(
            P=product[0].upper() + product[1:],
            p=product,
            a=rng.choice(same),
            a2=rng.choice(same),
            o=rng.choice(opposite),
            e=rng.choice(_EMOJI),
        )
        rows.append((text + rng.choice(_EMOJI), label))
    return rows


# Service processes started by tests and benchmarks.


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def log_tail(path: Path, lines: int = 60) -> str:
    if not path.exists():
        return ""
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def stop(process: subprocess.Popen[bytes], timeout: float = 30) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
