"""Per-key rate limits: at most `rate_limit_per_minute` requests per API key in each minute; beyond that,
429 with Retry-After (the seconds until the minute ends).

With Redis as the broker the counts live in Redis, shared by every API process; otherwise (the embedded
single-process setup) in memory. When Redis cannot be reached the request is let through: a rate limit
never takes the API down with it.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Protocol

from graft.config import Settings

log = logging.getLogger("graft.ratelimit")
WINDOW_SECONDS = 60


class RateLimiter(Protocol):
    async def hit(self, key: str) -> int | None:
        """Count one request of `key`; None when allowed, else the seconds to wait."""

    async def close(self) -> None: ...


class NoLimit:
    async def hit(self, key: str) -> int | None:
        return None

    async def close(self) -> None:
        return None


class MemoryLimiter:
    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._lock = threading.Lock()
        self._counts: dict[str, tuple[int, int]] = {}

    async def hit(self, key: str) -> int | None:
        now = time.time()
        window = int(now // WINDOW_SECONDS)
        with self._lock:  # held for a dict update, never across an await
            seen, count = self._counts.get(key, (window, 0))
            count = count + 1 if seen == window else 1
            self._counts[key] = (window, count)
            if len(self._counts) > 100_000:  # forget idle keys
                self._counts = {k: v for k, v in self._counts.items() if v[0] == window}
        return _wait(now, window) if count > self.limit else None

    async def close(self) -> None:
        return None


class RedisLimiter:
    """Counts in Redis through its asyncio client: a request waits for the count without holding a thread."""

    def __init__(self, url: str, limit: int) -> None:
        import redis.asyncio

        self.limit = limit
        self.client = redis.asyncio.Redis.from_url(url, socket_timeout=1, socket_connect_timeout=1)

    async def hit(self, key: str) -> int | None:
        now = time.time()
        window = int(now // WINDOW_SECONDS)
        name = f"graft:ratelimit:{key}:{window}"
        try:
            async with self.client.pipeline(transaction=False) as pipe:
                pipe.incr(name)
                pipe.expire(name, WINDOW_SECONDS * 2)
                count = int((await pipe.execute())[0])
        except Exception as exc:  # redis errors: let the request through
            log.warning("rate limit not checked (%s)", exc)
            return None
        return _wait(now, window) if count > self.limit else None

    async def close(self) -> None:
        await self.client.aclose()


def _wait(now: float, window: int) -> int:
    return max(1, int((window + 1) * WINDOW_SECONDS - now + 0.999))


def make_limiter(settings: Settings) -> RateLimiter:
    if settings.rate_limit_per_minute <= 0:
        return NoLimit()
    url = settings.effective_broker_url
    if url.startswith(("redis://", "rediss://")):
        return RedisLimiter(url, settings.rate_limit_per_minute)
    return MemoryLimiter(settings.rate_limit_per_minute)
