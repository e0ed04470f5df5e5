"""API keys: generated with 256 bits of randomness, stored only as digests, compared in constant time."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass

KEY_PREFIX = "graft_"
# operator: the instance's operator (the bootstrap key): every project, creates projects, any key.
# admin: a project's administrator: that project's objects and its own keys, nothing of other projects.
# member: the project's objects.
ROLE_OPERATOR = "operator"
ROLE_ADMIN = "admin"
ROLE_MEMBER = "member"
ROLES = (ROLE_OPERATOR, ROLE_ADMIN, ROLE_MEMBER)


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
    def is_operator(self) -> bool:
        return self.role == ROLE_OPERATOR

    @property
    def is_admin(self) -> bool:
        """May manage its project's keys (operators may manage every project's)."""
        return self.role in (ROLE_ADMIN, ROLE_OPERATOR)

    def manages(self, project_id: str) -> bool:
        """May manage this project's keys."""
        return self.is_operator or (self.role == ROLE_ADMIN and project_id == self.project_id)

    def sees(self, project_id: str) -> bool:
        return self.is_operator or project_id == self.project_id
