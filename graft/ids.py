"""Public ids: a type prefix and 24 random base32 characters (120 bits), e.g. `job_4k7...`."""

from __future__ import annotations

import base64
import secrets
from datetime import UTC, datetime

PREFIXES = ("proj", "key", "ds", "job", "mdl", "ckpt", "evt", "upl")


def new_id(prefix: str) -> str:
    assert prefix in PREFIXES, prefix
    token = base64.b32encode(secrets.token_bytes(15)).decode().lower()
    return f"{prefix}_{token}"


def utcnow() -> datetime:
    return datetime.now(UTC)
