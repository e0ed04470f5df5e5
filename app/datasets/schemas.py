from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
)

Task = Literal["text_classification", "image_classification", "tabular_classification"]


class DatasetOut(BaseModel):
    model_config = ConfigDict(
        from_attributes=True,
        json_schema_extra={
            "examples": [
                {
                    "object": "dataset",
                    "id": "ds_mb2kqv7gq3zd5w4bn6e2c3x1",
                    "project_id": "proj_2b4k7xq9z3m5n6p8r1t0v2w4",
                    "name": "reviews.csv",
                    "task": "text_classification",
                    "format": "csv",
                    "num_examples": 1200,
                    "labeled": True,
                    "classes": ["negative", "positive"],
                    "class_counts": {"negative": 590, "positive": 610},
                    "columns": {"text_column": "text", "label_column": "label"},
                    "bytes": 84210,
                    "sha256": "9f2c...",
                    "created_at": "2026-11-27T10:00:00Z",
                }
            ]
        },
    )

    object: Literal["dataset"] = "dataset"
    id: str
    project_id: str
    name: str
    task: Task
    format: Literal["csv", "jsonl", "zip"]
    num_examples: int
    labeled: bool
    classes: list[str]
    class_counts: dict[str, int]
    columns: dict[str, Any] = Field(
        validation_alias="schema_info",
        description="How the file was read: text/label columns, feature columns, or the archive layout.",
    )
    profile: dict[str, Any] | None = Field(
        default=None,
        description="What the data holds. Images: `image_sizes` (the shorter sides' min, median and max; "
        "`grey` when every image is; `read_at`, the side a network whose input follows the data, resnet-small, "
        "reads them at; a `warning` when the sizes are far apart). Text: `mean_text_chars`. None for datasets "
        "uploaded before profiles were.",
    )
    bytes: int
    sha256: str
    filename: str | None
    created_at: datetime
    pixels: int | None = Field(
        default=None,
        description="Image datasets: the pixels of all images together (read from their headers).",
    )


class Deleted(BaseModel):
    id: str
    object: str
    deleted: Literal[True] = True
