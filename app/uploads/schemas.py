from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from app.datasets.schemas import Task


class UploadCreate(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    filename: str = Field(
        min_length=1, max_length=300, description="The file's name; its extension tells the format."
    )
    size: int = Field(ge=1, description="The whole file's length in bytes.")
    sha256: str | None = Field(
        default=None,
        pattern="^[0-9a-fA-F]{64}$",
        description="The whole file's SHA-256 (hex); checked when the upload becomes a dataset.",
    )


class UploadOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    object: Literal["upload"] = "upload"
    id: str
    project_id: str
    filename: str
    size: int
    offset: int = Field(description="Bytes received and stored so far: send the next chunk from here.")
    sha256: str | None
    complete: bool = Field(description="All `size` bytes are here: create the dataset.")
    created_at: datetime
    updated_at: datetime
    expires_at: datetime = Field(description="An upload that does not grow until then is removed.")


class DatasetFromUpload(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    task: Task
    name: str | None = Field(
        default=None, min_length=1, max_length=300, description="Defaults to the file name."
    )
    text_column: str | None = Field(default=None, min_length=1, max_length=300)
    label_column: str | None = Field(default=None, min_length=1, max_length=300)
