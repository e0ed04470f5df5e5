"""Strings every store and encoder can hold: no NUL characters (PostgreSQL refuses them) and no lone
surrogates (no UTF-8 encoding exists for them)."""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import AfterValidator, StringConstraints

_UNSAFE = re.compile("[\x00\ud800-\udfff]")


def unsafe_character(value: str) -> str | None:
    """A description of the first character that cannot be stored, or None."""
    found = _UNSAFE.search(value)
    if found is None:
        return None
    return "a NUL character" if found.group() == "\x00" else "an invalid (lone surrogate) character"


def _check(value: str) -> str:
    problem = unsafe_character(value)
    if problem:
        raise ValueError(f"contains {problem}")
    return value


SafeStr = Annotated[str, AfterValidator(_check)]
# An id, or a short name standing for one (a baseline arm): 1 to 64 characters.
SafeId = Annotated[str, StringConstraints(min_length=1, max_length=64), AfterValidator(_check)]
