"""A short-lived, in-process cache of verified API keys: SHA-256 of the key → its Principal.

Why: an API key lookup is a database round trip (session, SELECT key JOIN user, close) on every
request: measured as the largest single cost of a gateway request (~25% of the server's CPU for
a non-streaming completion, bench/gateway_profile.py). Caching it for a few seconds removes it
from the hot path.

The security trade-off, and how it is bounded:
- Only successes are cached, never failures: a new key works at once, and garbage credentials
  cannot fill the cache (they also fail the checksum before any lookup).
- Entries live `ttl` seconds (LLM_API_API_KEY_CACHE_SECONDS, default 5, at most 60; 0 turns the
  cache off). Revoking a key, deactivating a user or changing their tier or role clears this
  process's cache at once and again after the change commits (`Authenticator.forget`), so the
  process that made the change never serves the old state. Other processes (workers, replicas)
  learn it when their entry expires: a revoked key may keep working there for up to `ttl`
  seconds. Changes made straight in the database (not through the API) wait out the TTL too.
- Keys are held by their SHA-256 (as stored in the database), never in clear, and the cache is
  bounded (`max_entries`, oldest first out).
JWT access tokens are not cached: their session check stays a database read (logout is instant).
"""

from __future__ import annotations

import time
from typing import Generic, TypeVar

P = TypeVar("P")  # the Principal (services/auth/principal.py imports this module)


class ApiKeyCache(Generic[P]):
    def __init__(self, ttl: float, max_entries: int = 10_000) -> None:
        self.ttl = ttl
        self.max_entries = max_entries
        self._entries: dict[str, tuple[float, P]] = {}
        # Bumped by clear(): a lookup that began before a clear must not store what it read.
        self.generation = 0

    @property
    def enabled(self) -> bool:
        return self.ttl > 0

    def get(self, key_digest: str) -> P | None:
        entry = self._entries.get(key_digest)
        if entry is None:
            return None
        expires, principal = entry
        if time.monotonic() >= expires:
            del self._entries[key_digest]
            return None
        return principal

    def put(self, key_digest: str, principal: P, generation: int) -> None:
        """Store what a lookup that began at `generation` found (dropped if a clear came
        between: it may have read the row before the change committed)."""
        if not self.enabled or generation != self.generation:
            return
        if len(self._entries) >= self.max_entries:
            del self._entries[next(iter(self._entries))]  # the oldest insertion
        self._entries[key_digest] = (time.monotonic() + self.ttl, principal)

    def clear(self) -> None:
        self._entries.clear()
        self.generation += 1

    def __len__(self) -> int:
        return len(self._entries)
