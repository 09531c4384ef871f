"""Login (OAuth2 password flow), refresh-token rotation and logout. Thin: the work is in
services/users.py and services/auth/tokens.py; login throttling in
services/rate_limit/login.py."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.security import OAuth2PasswordRequestForm

from llm_api.api.deps import AuthDep, CurrentUser, DbSession, StateDep
from llm_api.api.rate_limits import check_login, login_succeeded
from llm_api.api.scopes import requires_scope
from llm_api.api.security import public
from llm_api.core.exceptions import AuthenticationError, PermissionDeniedError
from llm_api.schemas.accounts import LogoutRequest, LogoutResponse, RefreshRequest, TokenResponse
from llm_api.services import audit
from llm_api.services.auth.tokens import RefreshTokenReusedError, TokenPair

router = APIRouter(prefix="/auth", tags=["auth"])

# One message for unknown email, wrong password and inactive account alike.
BAD_LOGIN = "Incorrect email or password."


def _response(pair: TokenPair) -> TokenResponse:
    return TokenResponse(
        access_token=pair.access_token,
        expires_in=pair.expires_in,
        refresh_token=pair.refresh_token,
    )


@router.post("/token", response_model=TokenResponse)
@public
async def login(
    form: Annotated[OAuth2PasswordRequestForm, Depends()],
    request: Request,
    db: DbSession,
    auth: AuthDep,
    state: StateDep,
) -> TokenResponse:
    if not state.settings.password_login_enabled:
        raise PermissionDeniedError(
            "Password sign-in is turned off on this server; use single sign-on or an API key.",
            code="password_login_disabled",
        )
    await check_login(request, form.username)  # growing delays per (account, client), pre-hash
    user = await auth.users.authenticate(db, form.username, form.password)
    if user is None:
        await _login_refused(request, state, db, auth, form.username)
        raise AuthenticationError(BAD_LOGIN, code="invalid_credentials")
    await login_succeeded(request, form.username)
    await audit.record(db, user, "auth.login", user, after={"method": "password"}, request=request)
    return _response(await auth.tokens.issue_pair(db, user.id))


async def record_refusal(
    request: Request, state: StateDep, target: audit.TargetLike, after: dict[str, object]
) -> None:
    """One audit row per refused sign-in, within a per-process bound (audit.FailureSampler),
    committed now: the request's own session rolls back."""
    sampler: audit.FailureSampler | None = getattr(request.app.state, "audit_login_sampler", None)
    if sampler is None:
        sampler = audit.FailureSampler(state.settings.audit_login_failures_per_minute)
        request.app.state.audit_login_sampler = sampler
    suppressed = sampler.admit()
    if suppressed is None:
        return
    await audit.record_now(
        state.db.sessions,
        audit.ANONYMOUS,
        "auth.login_failed",
        target,
        after={**after, "suppressed": suppressed},
        request=request,
    )


async def _login_refused(
    request: Request, state: StateDep, db: DbSession, auth: AuthDep, username: str
) -> None:
    # The submitted name is kept only when it is an account's email: a password typed into
    # the name field must not be stored.
    known = await auth.users.by_email(db, username) if len(username) <= 254 else None
    target = known if known is not None else audit.Target("user", None)
    await record_refusal(
        request, state, target, {"method": "password", "known_account": known is not None}
    )


@router.post("/refresh", response_model=TokenResponse)
@public
async def refresh(
    body: RefreshRequest, db: DbSession, auth: AuthDep, request: Request
) -> TokenResponse:
    try:
        user_id, pair = await auth.tokens.rotate(db, body.refresh_token)
    except RefreshTokenReusedError as exc:
        # Recorded in this session: the family revocation commits with it (keep_changes).
        await audit.record(
            db,
            audit.ANONYMOUS,
            "auth.refresh_token_reused",
            audit.Target("user", exc.user_id),
            after={"session_revoked": exc.family_id},
            request=request,
        )
        raise
    user = await auth.users.get(db, user_id)
    if user is None or not user.is_active:
        raise AuthenticationError("Invalid or expired refresh token.")
    return _response(pair)


@router.post("/logout", response_model=LogoutResponse)
@requires_scope("account")
async def logout(
    user: CurrentUser, db: DbSession, auth: AuthDep, body: LogoutRequest | None = None
) -> LogoutResponse:
    """Revoke this login (the access token's session) and, if given, a refresh token's."""
    assert user.user_id is not None
    if user.session_id is not None:
        await auth.tokens.revoke_family(db, user.session_id)
    if body is not None and body.refresh_token:
        await auth.tokens.revoke_by_token(db, body.refresh_token, user.user_id)
    return LogoutResponse()
