from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from graft.text import SafeStr


class ProjectCreate(BaseModel):
    model_config = ConfigDict(
        extra="forbid", strict=True, json_schema_extra={"examples": [{"name": "sentiment-team"}]}
    )

    name: SafeStr = Field(min_length=1, max_length=200)


class ProjectOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    object: Literal["project"] = "project"
    id: str
    name: str
    created_at: datetime


class ApiKeyCreate(BaseModel):
    model_config = ConfigDict(
        extra="forbid", strict=True, json_schema_extra={"examples": [{"name": "ci", "role": "member"}]}
    )

    name: SafeStr | None = Field(default=None, max_length=200)
    role: Literal["member", "admin", "operator"] = Field(
        default="member",
        description="member: the project's own objects; admin: also this project's API keys (nothing of other "
        "projects); operator: the whole instance (every project, creating projects) — only the operator can "
        "create operator keys.",
    )


class ApiKeyOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    object: Literal["api_key"] = "api_key"
    id: str
    project_id: str
    name: str | None
    role: str
    prefix: str = Field(
        description="The key's first 10 characters (`graft_` and 4 more), to recognise it; the key itself is "
        "stored only as a digest and never shown again."
    )
    created_at: datetime
    revoked_at: datetime | None


class ApiKeyCreated(ApiKeyOut):
    key: str = Field(description="The secret key. Shown only in this response.")
