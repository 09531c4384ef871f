"""Who is calling: turn a bearer credential (API key or JWT access token) into a `Principal`.

Every failure is the same 401 with the same message, whatever was wrong, so probing learns
nothing. The user row is read on every request, so deactivation, tier changes and logout take
effect at once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from sqlalchemy.ext.asyncio import AsyncSession

from llm_api.core.config import Settings
from llm_api.core.exceptions import AuthenticationError
from llm_api.db.tables import User
from llm_api.services.auth import api_keys
from llm_api.services.auth.passwords import Passwords
from llm_api.services.auth.tokens import Tokens
from llm_api.services.users import Users

# Longer than any key or token we issue; anything beyond is refused before any parsing.
MAX_CREDENTIAL_LENGTH = 2048


@dataclass(frozen=True, slots=True)
class Principal:
    user_id: str | None
    email: str | None
    tier: str
    role: str
    key_id: str | None = None
    session_id: str | None = None
    method: Literal["api_key", "jwt", "anonymous"] = "api_key"

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"


# Used only when LLM_API_AUTH_ENABLED=false and the caller is on loopback.
ANONYMOUS = Principal(user_id=None, email=None, tier="paid", role="user", method="anonymous")


def _from_user(
    user: User,
    method: Literal["api_key", "jwt"],
    key_id: str | None = None,
    session_id: str | None = None,
) -> Principal:
    return Principal(
        user_id=user.id,
        email=user.email,
        tier=user.tier,
        role=user.role,
        key_id=key_id,
        session_id=session_id,
        method=method,
    )


class Authenticator:
    def __init__(self, tokens: Tokens) -> None:
        self.tokens = tokens

    async def authenticate(self, db: AsyncSession, credential: str) -> Principal:
        if (
            not credential
            or len(credential) > MAX_CREDENTIAL_LENGTH
            or not credential.isascii()
            or not credential.isprintable()
        ):
            raise AuthenticationError()
        if credential.startswith(api_keys.KEY_PREFIX):
            found = await api_keys.find_active(db, credential)
            if found is None:
                raise AuthenticationError()
            key, user = found
            return _from_user(user, "api_key", key_id=key.id)
        if credential.count(".") != 2:
            raise AuthenticationError()
        claims = self.tokens.decode_access(credential)
        owner = await db.get(User, claims.user_id)
        if (
            owner is None
            or not owner.is_active
            or not await self.tokens.session_active(db, claims.session_id, owner.id)
        ):
            raise AuthenticationError()
        return _from_user(owner, "jwt", session_id=claims.session_id)


@dataclass
class AuthServices:
    """Built once in the lifespan (or by the CLI) and kept on AppState."""

    passwords: Passwords
    tokens: Tokens
    users: Users
    authenticator: Authenticator


def build_auth(settings: Settings) -> AuthServices:
    passwords = Passwords()
    tokens = Tokens(settings)
    return AuthServices(passwords, tokens, Users(passwords), Authenticator(tokens))
