"""API keys: generated with 256 bits of randomness, stored only as digests, compared in constant time."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass

KEY_PREFIX = "graft_"
ROLE_ADMIN = "admin"
ROLE_MEMBER = "member"
ROLES = (ROLE_ADMIN, ROLE_MEMBER)


def generate_api_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def key_lookup(key: str) -> str:
    """Finds the row; a different derivation from the digest, so the index reveals nothing to compare."""
    return hashlib.sha256(b"graft-lookup:" + key.encode()).hexdigest()[:32]


def key_digest(key: str) -> str:
    return hashlib.sha256(b"graft-key:" + key.encode()).hexdigest()


def digest_matches(key: str, digest: str) -> bool:
    return hmac.compare_digest(key_digest(key), digest)


def display_prefix(key: str) -> str:
    return key[: len(KEY_PREFIX) + 4]


@dataclass(frozen=True)
class Principal:
    """Who is calling: the project the key belongs to and what the key may do."""

    project_id: str
    key_id: str
    role: str

    @property
    def is_admin(self) -> bool:
        return self.role == ROLE_ADMIN
