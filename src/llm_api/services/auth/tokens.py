"""JWT access tokens and opaque, rotating refresh tokens.

Access tokens: HS256 only (the algorithm is pinned on decode, so `alg: none` and algorithm
confusion fail), signature always verified, `exp`/`iat`/`nbf`/`iss`/`aud`/`sub` required. Tokens
carrying key-lookup headers (`kid`, `jku`, `jwk`, `x5u`, ...) are refused: we never issue them.
Each access token names its login (`sid` = refresh family), so logout revokes it at once.

Refresh tokens: random strings stored as SHA-256 digests. Each use rotates the token; presenting
an already-rotated token means it was stolen or replayed, so the whole family is revoked.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import jwt
from sqlalchemy import exists, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from llm_api.core.config import Settings
from llm_api.core.exceptions import AuthenticationError
from llm_api.db.tables import RefreshToken, as_utc, new_id, utcnow

ALGORITHM = "HS256"
_ALLOWED_HEADERS = {"alg", "typ"}
_REQUIRED_CLAIMS = ["exp", "iat", "nbf", "iss", "aud", "sub"]
REFRESH_PREFIX = "rt-llmapi-"


class RefreshTokenReusedError(AuthenticationError):
    """A rotated refresh token came back. The family revocation must survive the error, so the
    request's session commits instead of rolling back (see api/deps.get_db)."""

    keep_changes = True

    def __init__(self, message: str, *, user_id: str, family_id: str) -> None:
        super().__init__(message)
        self.user_id, self.family_id = user_id, family_id  # for the audit log


@dataclass(frozen=True, slots=True)
class AccessClaims:
    user_id: str
    session_id: str


@dataclass(frozen=True, slots=True)
class TokenPair:
    access_token: str
    refresh_token: str
    expires_in: int


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


class Tokens:
    def __init__(self, settings: Settings) -> None:
        self.secret = settings.jwt_secret
        self.issuer = settings.jwt_issuer
        self.audience = settings.jwt_audience
        self.access_ttl = timedelta(minutes=settings.access_token_minutes)
        self.refresh_ttl = timedelta(days=settings.refresh_token_days)

    # --- access tokens ---------------------------------------------------------------------

    def issue_access(self, user_id: str, session_id: str) -> str:
        now = utcnow()
        claims: dict[str, Any] = {
            "sub": user_id,
            "sid": session_id,
            "iss": self.issuer,
            "aud": self.audience,
            "iat": now,
            "nbf": now,
            "exp": now + self.access_ttl,
            "jti": secrets.token_hex(8),
        }
        return jwt.encode(claims, self.secret, algorithm=ALGORITHM)

    def decode_access(self, token: str) -> AccessClaims:
        try:
            header = jwt.get_unverified_header(token)
            if set(header) - _ALLOWED_HEADERS:
                raise AuthenticationError()
            claims = jwt.decode(
                token,
                self.secret,
                algorithms=[ALGORITHM],
                audience=self.audience,
                issuer=self.issuer,
                options={"require": _REQUIRED_CLAIMS, "verify_signature": True},
            )
        except jwt.PyJWTError as exc:
            raise AuthenticationError() from exc
        sub, sid = claims.get("sub"), claims.get("sid")
        if not isinstance(sub, str) or not isinstance(sid, str):
            raise AuthenticationError()
        return AccessClaims(user_id=sub, session_id=sid)

    # --- refresh tokens --------------------------------------------------------------------

    async def issue_pair(
        self, db: AsyncSession, user_id: str, family_id: str | None = None
    ) -> TokenPair:
        family_id = family_id or new_id()
        raw = REFRESH_PREFIX + secrets.token_urlsafe(32)
        db.add(
            RefreshToken(
                user_id=user_id,
                family_id=family_id,
                token_hash=_digest(raw),
                expires_at=utcnow() + self.refresh_ttl,
            )
        )
        await db.flush()
        return TokenPair(
            access_token=self.issue_access(user_id, family_id),
            refresh_token=raw,
            expires_in=int(self.access_ttl.total_seconds()),
        )

    async def _find(self, db: AsyncSession, raw: str) -> RefreshToken | None:
        if not raw.startswith(REFRESH_PREFIX) or len(raw) > 128:
            return None
        row = await db.execute(select(RefreshToken).where(RefreshToken.token_hash == _digest(raw)))
        return row.scalar_one_or_none()

    async def rotate(self, db: AsyncSession, raw: str) -> tuple[str, TokenPair]:
        """Exchange a refresh token for a new pair; returns (user_id, pair)."""
        token = await self._find(db, raw)
        if token is None or token.revoked_at is not None or as_utc(token.expires_at) <= utcnow():
            raise AuthenticationError("Invalid or expired refresh token.")
        # Mark it used atomically: of two concurrent uses, exactly one wins.
        used = await db.execute(
            update(RefreshToken)
            .where(RefreshToken.id == token.id, RefreshToken.rotated_at.is_(None))
            .values(rotated_at=utcnow())
        )
        if getattr(used, "rowcount", 0) != 1:
            await self.revoke_family(db, token.family_id)
            raise RefreshTokenReusedError(
                "Refresh token reuse detected; the session is revoked.",
                user_id=token.user_id,
                family_id=token.family_id,
            )
        return token.user_id, await self.issue_pair(db, token.user_id, token.family_id)

    async def revoke_family(self, db: AsyncSession, family_id: str) -> None:
        await db.execute(
            update(RefreshToken)
            .where(RefreshToken.family_id == family_id, RefreshToken.revoked_at.is_(None))
            .values(revoked_at=utcnow())
        )

    async def revoke_by_token(self, db: AsyncSession, raw: str, user_id: str) -> None:
        token = await self._find(db, raw)
        if token is not None and token.user_id == user_id:
            await self.revoke_family(db, token.family_id)

    async def session_active(self, db: AsyncSession, session_id: str, user_id: str) -> bool:
        """The login `session_id` belongs to `user_id` and is not logged out or revoked."""
        query = select(
            exists().where(
                RefreshToken.family_id == session_id,
                RefreshToken.user_id == user_id,
                RefreshToken.revoked_at.is_(None),
            )
        )
        return bool((await db.execute(query)).scalar())
