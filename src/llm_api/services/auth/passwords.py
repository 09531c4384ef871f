"""argon2id password hashing with OWASP's parameters (m=19 MiB, t=2, p=1).

Hashing costs ~20 ms of CPU and 19 MiB, so it runs in a worker thread, and over-long passwords
are refused before hashing. When a login names an unknown email we still verify against a dummy
hash, so the response time does not reveal whether the account exists.
"""

from __future__ import annotations

import asyncio
from functools import cached_property

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

MIN_PASSWORD_LENGTH = 8
MAX_PASSWORD_LENGTH = 256


class Passwords:
    def __init__(self, time_cost: int = 2, memory_cost: int = 19456, parallelism: int = 1) -> None:
        self.hasher = PasswordHasher(
            time_cost=time_cost, memory_cost=memory_cost, parallelism=parallelism
        )

    @cached_property
    def _dummy_hash(self) -> str:
        return self.hasher.hash("dummy password for timing equalisation")

    @staticmethod
    def acceptable(password: str) -> bool:
        return MIN_PASSWORD_LENGTH <= len(password) <= MAX_PASSWORD_LENGTH

    async def hash(self, password: str) -> str:
        if not self.acceptable(password):
            raise ValueError(
                f"passwords must be {MIN_PASSWORD_LENGTH} to {MAX_PASSWORD_LENGTH} characters"
            )
        return await asyncio.to_thread(self.hasher.hash, password)

    def _verify(self, stored: str | None, password: str) -> bool:
        try:
            return self.hasher.verify(stored or self._dummy_hash, password) and stored is not None
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            return False

    async def verify(self, stored: str | None, password: str) -> bool:
        """True when `password` matches `stored`. With `stored=None` (no such user) the dummy
        hash is verified anyway and False returned, taking the same time."""
        if len(password) > MAX_PASSWORD_LENGTH:
            return False
        return await asyncio.to_thread(self._verify, stored, password)

    def needs_rehash(self, stored: str) -> bool:
        return self.hasher.check_needs_rehash(stored)
