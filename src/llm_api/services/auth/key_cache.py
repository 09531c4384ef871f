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
- A key's expiry is not bounded by the TTL: the cached principal carries it (`controls`), and
  `authenticate` checks it on every hit (key_controls.py), so a cached key stops at its expiry.
JWT access tokens are not cached: their session check stays a database read (logout is instant).

Database outages: a key verified less than `outage_grace` seconds ago (LLM_API_API_KEY_OUTAGE_
GRACE_SECONDS, default 300) is still served while the database cannot be reached (`during_outage`),
as a gateway must not go down with its database while usage is buffered durably anyway. Keys not
seen within the grace period, JWTs and every account route still get 503. Nothing is decided from
a stale entry once the database answers again: the next lookup re-reads the row, so a revocation
made meanwhile applies as soon as the database is back.
"""

from __future__ import annotations

import time
from typing import Generic, TypeVar

P = TypeVar("P")  # the Principal (services/auth/principal.py imports this module)


class ApiKeyCache(Generic[P]):
    def __init__(self, ttl: float, max_entries: int = 10_000, outage_grace: float = 0.0) -> None:
        self.ttl = ttl
        self.outage_grace = outage_grace
        self.max_entries = max_entries
        # digest → (monotonic time of the last successful database verification, principal)
        self._entries: dict[str, tuple[float, P]] = {}
        # Bumped by clear(): a lookup that began before a clear must not store what it read.
        self.generation = 0

    @property
    def enabled(self) -> bool:
        return self.ttl > 0

    @property
    def keeps_entries(self) -> bool:
        return self.ttl > 0 or self.outage_grace > 0

    def get(self, key_digest: str) -> P | None:
        """A principal verified less than `ttl` ago: trusted without a database read."""
        return self._younger_than(key_digest, self.ttl)

    def during_outage(self, key_digest: str) -> P | None:
        """A principal verified less than `outage_grace` (or `ttl`) ago: only for when the
        database cannot be reached."""
        return self._younger_than(key_digest, max(self.ttl, self.outage_grace))

    def _younger_than(self, key_digest: str, age: float) -> P | None:
        entry = self._entries.get(key_digest)
        if entry is None:
            return None
        verified_at, principal = entry
        if time.monotonic() - verified_at >= age:
            if time.monotonic() - verified_at >= max(self.ttl, self.outage_grace):
                del self._entries[key_digest]
            return None
        return principal

    def put(self, key_digest: str, principal: P, generation: int) -> None:
        """Store what a lookup that began at `generation` found (dropped if a clear came
        between: it may have read the row before the change committed)."""
        if not self.keeps_entries or generation != self.generation:
            return
        self._entries.pop(key_digest, None)  # re-inserted last: eviction is oldest-verified first
        if len(self._entries) >= self.max_entries:
            del self._entries[next(iter(self._entries))]  # the oldest verification
        self._entries[key_digest] = (time.monotonic(), principal)

    def clear(self) -> None:
        self._entries.clear()
        self.generation += 1

    def __len__(self) -> int:
        return len(self._entries)
