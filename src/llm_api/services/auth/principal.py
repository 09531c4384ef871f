"""Who is calling: turn a bearer credential (API key or JWT access token) into a `Principal`.

Every failure is the same 401 with the same message, whatever was wrong, so probing learns
nothing. The user row is read on every request (for an API key: unless it was verified less
than LLM_API_API_KEY_CACHE_SECONDS ago, see key_cache.py), so deactivation, tier changes and
logout take effect at once on this process.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Literal

import structlog
from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncSession

from llm_api.core.config import Settings
from llm_api.core.exceptions import AuthenticationError
from llm_api.db.tables import User
from llm_api.services.auth import api_keys
from llm_api.services.auth.key_cache import ApiKeyCache
from llm_api.services.auth.key_controls import KeyControls, KeyExpiredError
from llm_api.services.auth.passwords import Passwords
from llm_api.services.auth.scopes import DEFAULT_KEY_SCOPES, allowed_for, parse
from llm_api.services.auth.tokens import Tokens
from llm_api.services.users import Users

log = structlog.get_logger(__name__)

# Longer than any key or token we issue; anything beyond is refused before any parsing.
MAX_CREDENTIAL_LENGTH = 2048
# During a database outage, how long requests with a key in its grace period skip the database
# before one tries it again (so a partition does not make every request wait on a connect).
OUTAGE_RETRY_SECONDS = 1.0


@dataclass(frozen=True, slots=True)
class Principal:
    user_id: str | None
    email: str | None
    tier: str
    role: str
    key_id: str | None = None
    session_id: str | None = None
    method: Literal["api_key", "jwt", "anonymous"] = "api_key"
    # What this credential may do (services/auth/scopes.py): a key's own scopes within what
    # its owner's role allows; a password login holds all that the role allows.
    scopes: frozenset[str] = DEFAULT_KEY_SCOPES
    # The team of a team's service key (None for a personal key or a login).
    team_id: str | None = None
    # The key's own controls (allow-lists, expiry, limits; key_controls.py), None if none.
    controls: KeyControls | None = None

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"

    @property
    def tenant(self) -> str:
        """Whose share this request counts against (budgets, fair queuing): the key's team when
        it has one, else the user; anonymous callers share one tenant."""
        if self.team_id is not None:
            return f"team:{self.team_id}"
        return f"user:{self.user_id}" if self.user_id is not None else "anonymous"


# Used only when LLM_API_AUTH_ENABLED=false, for a direct loopback caller (api/security.py).
# Its own tier, not "paid": no one paid, and anything on this host can be that caller, so it
# gets the `anonymous` tier's limits (per client) and no paid model; use an account for those.
ANONYMOUS = Principal(user_id=None, email=None, tier="anonymous", role="user", method="anonymous")


def _from_user(
    user: User,
    method: Literal["api_key", "jwt"],
    key_id: str | None = None,
    session_id: str | None = None,
    key_scopes: str | None = None,
    team_id: str | None = None,
    controls: KeyControls | None = None,
) -> Principal:
    role_scopes = allowed_for(user.role)
    return Principal(
        user_id=user.id,
        email=user.email,
        tier=user.tier,
        role=user.role,
        key_id=key_id,
        session_id=session_id,
        method=method,
        # A demoted admin's key keeps `admin` in its row but no longer holds it.
        scopes=role_scopes if method == "jwt" else parse(key_scopes) & role_scopes,
        team_id=team_id,
        controls=controls,
    )


class Authenticator:
    def __init__(
        self, tokens: Tokens, api_key_cache_seconds: float = 0.0, outage_grace_seconds: float = 0.0
    ) -> None:
        self.tokens = tokens
        # see key_cache.py for the TTL and the outage grace period
        self.keys: ApiKeyCache[Principal] = ApiKeyCache(
            api_key_cache_seconds, outage_grace=outage_grace_seconds
        )
        self._outage_since: float | None = None  # monotonic time of the first failed lookup
        self._retry_database_at = 0.0

    def cached(self, credential: str) -> Principal | None:
        """The principal of an API key verified less than the cache TTL ago (no database)."""
        if not self.keys.enabled or not credential.startswith(api_keys.KEY_PREFIX):
            return None
        return self.keys.get(api_keys.digest(credential))

    def _during_outage(self, credential: str) -> Principal | None:
        if not credential.startswith(api_keys.KEY_PREFIX):
            return None  # JWTs are bound to a login that only the database can vouch for
        return self.keys.during_outage(api_keys.digest(credential))

    def between_outage_retries(self, credential: str) -> Principal | None:
        """While the database is known to be down and not yet due for a retry: the principal of
        a key verified within the grace period, without waiting on the database."""
        if self._outage_since is None or time.monotonic() >= self._retry_database_at:
            return None
        return self._during_outage(credential)

    def database_unreachable(self, credential: str, error: BaseException) -> Principal | None:
        """Note a lookup that could not reach the database (one warning per outage); return the
        principal to serve anyway (a key verified within the grace period) or None (→ 503)."""
        now = time.monotonic()
        if self._outage_since is None:
            self._outage_since = now
            log.warning(
                "auth_database_unreachable",
                error=type(error).__name__,
                grace_seconds=self.keys.outage_grace,
            )
        self._retry_database_at = now + OUTAGE_RETRY_SECONDS
        return self._during_outage(credential)

    def _database_answered(self) -> None:
        if self._outage_since is not None:
            outage = time.monotonic() - self._outage_since
            self._outage_since = None
            log.info("auth_database_back", outage_seconds=round(outage, 1))

    def forget(self, db: AsyncSession) -> None:
        """Call when a key is revoked or a user's status, tier or role changes: forget every
        cached key now, and again when `db` commits (a request may read the old row until
        then)."""
        self.keys.clear()
        event.listen(db.sync_session, "after_commit", lambda _: self.keys.clear(), once=True)

    async def authenticate(self, db: AsyncSession, credential: str) -> Principal:
        if (
            not credential
            or len(credential) > MAX_CREDENTIAL_LENGTH
            or not credential.isascii()
            or not credential.isprintable()
        ):
            raise AuthenticationError()
        if credential.startswith(api_keys.KEY_PREFIX):
            generation = self.keys.generation
            found = await api_keys.find_active(db, credential)
            self._database_answered()
            if found is None:
                raise AuthenticationError()  # failures are never cached
            key, user = found
            controls = KeyControls.of(key)
            if controls is not None and controls.expired():
                raise KeyExpiredError()  # never cached; nor is any other failure
            principal = _from_user(
                user,
                "api_key",
                key_id=key.id,
                key_scopes=key.scopes,
                team_id=key.team_id,
                controls=controls,
            )
            self.keys.put(key.key_hash, principal, generation)
            return principal
        if credential.count(".") != 2:
            raise AuthenticationError()
        claims = self.tokens.decode_access(credential)
        owner = await db.get(User, claims.user_id)
        self._database_answered()
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
    authenticator = Authenticator(
        tokens, settings.api_key_cache_seconds, settings.api_key_outage_grace_seconds
    )
    return AuthServices(passwords, tokens, Users(passwords), authenticator)
