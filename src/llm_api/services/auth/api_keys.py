"""API keys: `sk-llmapi-<32 base62 random><6 base62 CRC32>`.

The type prefix and the checksum let secret scanners (GitHub push protection, trufflehog) find
and validate leaked keys offline, and let us reject typos and garbage without a database query.
Only the SHA-256 of the key and a short display prefix are stored; the key is shown once.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import string
import zlib
from collections.abc import Iterable
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from llm_api.db.tables import ApiKey, User, utcnow
from llm_api.services.auth.scopes import DEFAULT_KEY_SCOPES, serialize

KEY_PREFIX = "sk-llmapi-"
_ALPHABET = string.digits + string.ascii_letters  # base62
_RANDOM_LEN = 32  # ~190 bits
_CHECKSUM_LEN = 6
_KEY_RE = re.compile(rf"^{KEY_PREFIX}[0-9A-Za-z]{{{_RANDOM_LEN + _CHECKSUM_LEN}}}$")
DISPLAY_LEN = len(KEY_PREFIX) + 6


def _base62(number: int, width: int) -> str:
    out = []
    for _ in range(width):
        number, digit = divmod(number, 62)
        out.append(_ALPHABET[digit])
    return "".join(reversed(out))


def _checksum(body: str) -> str:
    return _base62(zlib.crc32(body.encode("ascii")), _CHECKSUM_LEN)


def generate() -> str:
    body = "".join(secrets.choice(_ALPHABET) for _ in range(_RANDOM_LEN))
    return f"{KEY_PREFIX}{body}{_checksum(body)}"


def well_formed(key: str) -> bool:
    """Shape and checksum only; says nothing about whether the key exists."""
    if not _KEY_RE.fullmatch(key):
        return False
    body, check = key[len(KEY_PREFIX) : -_CHECKSUM_LEN], key[-_CHECKSUM_LEN:]
    return hmac.compare_digest(_checksum(body), check)


def digest(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def display_prefix(key: str) -> str:
    return key[:DISPLAY_LEN]


def matches(stored_digest: str, key: str) -> bool:
    return hmac.compare_digest(stored_digest, digest(key))


# --- storage: the caller's session owns the transaction; nothing here commits ---------------


async def create_key(
    db: AsyncSession,
    user_id: str,
    name: str | None,
    scopes: Iterable[str] = DEFAULT_KEY_SCOPES,
    *,
    team_id: str | None = None,
    **controls: Any,
) -> tuple[ApiKey, str]:
    """A new key with `scopes` (inference only unless asked) and its controls (`models`,
    `expires_at`, `limits`, `allowed_ips`, validated by key_controls.py). Callers check first
    that the creator may grant them (`scopes.check_grant`, key_management.py)."""
    raw = generate()
    row = ApiKey(
        user_id=user_id,
        name=name,
        prefix=display_prefix(raw),
        key_hash=digest(raw),
        scopes=serialize(scopes),
        team_id=team_id,
        **controls,
    )
    db.add(row)
    await db.flush()
    return row, raw


async def count_active(db: AsyncSession, user_id: str) -> int:
    """The user's active personal keys (a team's keys count against the team)."""
    query = select(func.count()).where(
        ApiKey.user_id == user_id, ApiKey.team_id.is_(None), ApiKey.revoked_at.is_(None)
    )
    return int((await db.execute(query)).scalar_one())


async def list_keys(db: AsyncSession, user_id: str) -> list[ApiKey]:
    """The user's active personal keys (team keys are listed with their team)."""
    query = (
        select(ApiKey)
        .where(ApiKey.user_id == user_id, ApiKey.team_id.is_(None), ApiKey.revoked_at.is_(None))
        .order_by(ApiKey.created_at)
    )
    return list((await db.execute(query)).scalars())


async def revoke_key(db: AsyncSession, key_id: str, user_id: str | None) -> bool:
    """Revoke one key. With `user_id`, only that user's key (others' keys look absent)."""
    query = update(ApiKey).where(ApiKey.id == key_id, ApiKey.revoked_at.is_(None))
    if user_id is not None:
        query = query.where(ApiKey.user_id == user_id)
    result = await db.execute(query.values(revoked_at=utcnow()))
    return bool(getattr(result, "rowcount", 0))


async def find_active(db: AsyncSession, raw: str) -> tuple[ApiKey, User] | None:
    """The key and its owner, if the key exists, is not revoked and its owner is active."""
    if not well_formed(raw):
        return None
    query = (
        select(ApiKey, User)
        .join(User, User.id == ApiKey.user_id)
        .where(ApiKey.key_hash == digest(raw), ApiKey.revoked_at.is_(None))
    )
    row = (await db.execute(query)).first()
    if row is None:
        return None
    key, user = row  # (Row.tuple() is deprecated: a warning per call)
    if not matches(key.key_hash, raw) or not user.is_active:
        return None
    return key, user
