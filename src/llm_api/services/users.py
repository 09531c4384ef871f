"""Users: creation, lookup, login check, profile and admin updates. Never commits: the caller's
session (one per request, or the CLI's) owns the transaction."""

from __future__ import annotations

import re
from typing import Literal

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from llm_api.core.exceptions import ConflictError, InvalidRequestError
from llm_api.db.tables import User
from llm_api.services.auth.passwords import (
    MAX_PASSWORD_LENGTH,
    MIN_PASSWORD_LENGTH,
    Passwords,
)

Tier = Literal["free", "paid"]
NO_PASSWORD = "!sso"  # noqa: S105 - the password_hash of single sign-on users: matches nothing
Role = Literal["user", "admin"]

# A deliberately simple check: the email is a login name here, we send no mail, and a full
# RFC 5322 validator would add a dependency for no security gain.
_EMAIL_RE = re.compile(r"^[^@\s\x00-\x1f]{1,64}@[^@\s\x00-\x1f]+\.[^@\s\x00-\x1f]+$")


def normalize_email(email: str) -> str:
    email = email.strip().lower()
    if len(email) > 254 or not _EMAIL_RE.fullmatch(email):
        raise InvalidRequestError("Invalid email address.", param="email")
    return email


class Users:
    def __init__(self, passwords: Passwords) -> None:
        self.passwords = passwords

    async def create(
        self,
        db: AsyncSession,
        email: str,
        password: str,
        *,
        role: Role = "user",
        tier: Tier = "free",
    ) -> User:
        email = normalize_email(email)
        if not Passwords.acceptable(password):
            raise InvalidRequestError(
                f"Passwords must be {MIN_PASSWORD_LENGTH} to {MAX_PASSWORD_LENGTH} characters.",
                param="password",
            )
        if await self.by_email(db, email) is not None:
            raise ConflictError("A user with this email already exists.", param="email")
        user = User(
            email=email,
            password_hash=await self.passwords.hash(password),
            role=role,
            tier=tier,
            is_active=True,
        )
        db.add(user)
        try:
            await db.flush()
        except IntegrityError as exc:  # a concurrent create won the race
            raise ConflictError("A user with this email already exists.", param="email") from exc
        return user

    async def create_external(
        self, db: AsyncSession, email: str, *, tier: Tier, display_name: str | None
    ) -> User:
        """A user who signs in through single sign-on: no password (the stored value is no
        argon2 hash, so no password ever matches it)."""
        user = User(
            email=normalize_email(email),
            password_hash=NO_PASSWORD,
            display_name=display_name,
            role="user",
            tier=tier,
            is_active=True,
        )
        db.add(user)
        try:
            await db.flush()
        except IntegrityError as exc:  # a concurrent first sign-in won the race
            raise ConflictError("A user with this email already exists.", param="email") from exc
        return user

    async def get(self, db: AsyncSession, user_id: str) -> User | None:
        return await db.get(User, user_id)

    async def by_email(self, db: AsyncSession, email: str) -> User | None:
        query = select(User).where(User.email == email.strip().lower())
        return (await db.execute(query)).scalar_one_or_none()

    async def authenticate(self, db: AsyncSession, email: str, password: str) -> User | None:
        """The active user with this email and password, else None. Unknown emails cost the
        same argon2 verification as wrong passwords."""
        user = await self.by_email(db, email) if len(email) <= 254 else None
        ok = await self.passwords.verify(user.password_hash if user else None, password)
        if not ok or user is None or not user.is_active:
            return None
        if self.passwords.needs_rehash(user.password_hash):
            user.password_hash = await self.passwords.hash(password)
        return user

    async def count(self, db: AsyncSession) -> int:
        return int((await db.execute(select(func.count()).select_from(User))).scalar_one())

    async def list(self, db: AsyncSession, limit: int, offset: int) -> list[User]:
        query = select(User).order_by(User.created_at, User.id).limit(limit).offset(offset)
        return list((await db.execute(query)).scalars())
