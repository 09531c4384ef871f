"""Wire types of the account routes: tokens, API keys, users. None of them carries a hash."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from llm_api.core.rate_limits import TierLimits
from llm_api.db.tables import as_utc
from llm_api.services.auth.passwords import MAX_PASSWORD_LENGTH
from llm_api.services.auth.scopes import ALL_SCOPES, Scope

Name = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=100)]
Email = Annotated[str, StringConstraints(strip_whitespace=True, min_length=3, max_length=254)]
Password = Annotated[str, StringConstraints(min_length=1, max_length=MAX_PASSWORD_LENGTH)]


class Strict(BaseModel):
    # Unknown fields are refused (400), so `role`/`tier` cannot be smuggled into a request.
    model_config = ConfigDict(extra="forbid")


class TokenResponse(BaseModel):
    access_token: str
    token_type: Literal["bearer"] = "bearer"  # noqa: S105 - the OAuth2 token type
    expires_in: int
    refresh_token: str


class RefreshRequest(Strict):
    refresh_token: Annotated[str, StringConstraints(min_length=1, max_length=512)]


class LogoutRequest(Strict):
    refresh_token: Annotated[str, StringConstraints(min_length=1, max_length=512)] | None = None


class LogoutResponse(BaseModel):
    revoked: bool = True


ModelPattern = Annotated[
    str, StringConstraints(strip_whitespace=True, min_length=1, max_length=256)
]
Cidr = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=64)]
# Epoch seconds or an ISO 8601 time (validated in services/auth/key_controls.py).
Expiry = float | str


class ApiKeyControls(Strict):
    """Per-key controls (docs/security.md). Omitted: unrestricted; in a PATCH, null clears."""

    name: Name | None = None
    models: Annotated[list[ModelPattern], Field(max_length=100)] | None = Field(
        None,
        description="Models the key may use: ids, aliases or wildcards (`smollm2-*`). "
        "Default: every model its owner may use.",
    )
    expires_at: Expiry | None = Field(
        None, description="When the key stops working: epoch seconds or ISO 8601 (UTC)."
    )
    limits: TierLimits | None = Field(
        None, description="The key's own rate limits, each at most the owner's tier's."
    )
    allowed_ips: Annotated[list[Cidr], Field(max_length=100)] | None = Field(
        None, description="Client addresses (CIDR blocks) the key may be used from."
    )
    priority: Literal["interactive", "low", "batch"] | None = Field(
        None,
        description="The highest priority class the key's requests run in (default "
        "interactive); the `x-llm-api-priority` header can only lower it further.",
    )


class ApiKeyCreate(ApiKeyControls):
    scopes: Annotated[list[Scope], Field(min_length=1, max_length=len(ALL_SCOPES))] | None = Field(
        None,
        description="What the key may do (default: inference only). Only scopes the caller "
        "holds can be granted; `admin` only by administrators.",
    )
    team_id: Annotated[str, StringConstraints(max_length=64)] | None = Field(
        None, description="Make a team's service key (team owners and admins only)."
    )


class ApiKeyUpdate(ApiKeyControls):
    """PATCH /v1/keys/{id}: the fields given replace the key's (null clears one)."""


class ApiKeyInfo(BaseModel):
    id: str
    object: Literal["api_key"] = "api_key"
    name: str | None
    prefix: str = Field(description="The first characters of the key, for recognising it.")
    scopes: list[Scope] = Field(description="What the key may do (docs/security.md).")
    created_at: int
    team_id: str | None = None
    expires_at: int | None = None
    models: list[str] | None = None
    allowed_ips: list[str] | None = None
    limits: dict[str, int] | None = None
    priority: str | None = None


class ApiKeyCreated(ApiKeyInfo):
    key: str = Field(description="The key itself. Shown once; store it now.")


class ApiKeyList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ApiKeyInfo]


class DeletedApiKey(BaseModel):
    id: str
    object: Literal["api_key"] = "api_key"
    deleted: bool = True


class UserInfo(BaseModel):
    id: str
    object: Literal["user"] = "user"
    email: str
    display_name: str | None
    tier: Literal["free", "paid"]
    role: Literal["user", "admin"]
    is_active: bool
    created_at: int


class UserList(BaseModel):
    object: Literal["list"] = "list"
    data: list[UserInfo]


class UserUpdate(Strict):
    """What a user may change about themselves. `role`, `tier` and anything else → 400."""

    display_name: Name | None = None


class AdminUserCreate(Strict):
    email: Email
    password: Password
    role: Literal["user", "admin"] = "user"
    tier: Literal["free", "paid"] = "free"


class AdminUserUpdate(Strict):
    tier: Literal["free", "paid"] | None = None
    role: Literal["user", "admin"] | None = None
    is_active: bool | None = None


def epoch(value: datetime) -> int:
    return int(as_utc(value).timestamp())
