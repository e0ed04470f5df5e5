"""The API key cache: what the database said about a key is trusted for a short while, then asked again."""

from __future__ import annotations

import pytest

from app.core.auth import KeyCache, KeyRecord
from app.core.security import Principal

RECORD = KeyRecord(
    principal=Principal(project_id="proj_a", key_id="key_a", role="member"), digest="d", revoked=False
)


def test_an_entry_expires_after_its_seconds(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [1000.0]
    monkeypatch.setattr("app.core.auth.time.monotonic", lambda: now[0])
    cache = KeyCache(seconds=10)
    cache.put("lookup", RECORD)
    now[0] += 9.9
    assert cache.get("lookup") == RECORD
    now[0] += 0.2
    assert cache.get("lookup") is None  # asked again: a revocation elsewhere reaches it within 10 s


def test_forget_drops_an_entry_at_once_and_zero_seconds_caches_nothing() -> None:
    cache = KeyCache(seconds=10)
    cache.put("lookup", RECORD)
    cache.forget("lookup")
    assert cache.get("lookup") is None
    off = KeyCache(seconds=0)
    off.put("lookup", RECORD)
    assert off.get("lookup") is None


def test_the_cache_stays_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("app.core.auth.MAX_CACHED_KEYS", 100)
    cache = KeyCache(seconds=60)
    for i in range(1000):
        cache.put(f"lookup-{i}", RECORD)
    assert len(cache._entries) <= 100
    assert cache.get("lookup-999") == RECORD
