"""Single sign-on routes under /v1/auth/oidc (services/auth/oidc.py holds the protocol):

- GET  /v1/auth/oidc           what the sign-in page shows (public; says whether SSO is on)
- GET  /v1/auth/oidc/login     redirect to the provider, with a signed flow cookie (public)
- GET  /v1/auth/oidc/callback  the provider's redirect back: verify, find or create the user,
                               issue our own token pair, redirect to the web UI (public)
- POST /v1/auth/oidc/session   the web UI collects that login as the password form does: the
                               refresh token travels in an HttpOnly cookie for this path only
                               and is rotated on collection (so it works once) (public)

The UI is always sent to `/#/sso`: no return URL is read from the request (no open redirect).
"""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import RedirectResponse
from pydantic import BaseModel
from sqlalchemy import select

from llm_api.api.deps import AuthDep, DbSession, StateDep
from llm_api.api.security import public
from llm_api.api.v1.endpoints.auth import record_refusal
from llm_api.core.exceptions import (
    APIError,
    AuthenticationError,
    InvalidRequestError,
    NotFoundError,
    PermissionDeniedError,
    ServiceUnavailableError,
)
from llm_api.db.tables import Team, TeamMember, User
from llm_api.schemas.accounts import TokenResponse
from llm_api.services import audit
from llm_api.services.auth.oidc import (
    HANDOFF_COOKIE,
    HANDOFF_TTL_S,
    STATE_COOKIE,
    STATE_TTL,
    Identity,
    SingleSignOn,
    SsoError,
)
from llm_api.services.auth.tokens import RefreshTokenReusedError

router = APIRouter(prefix="/auth/oidc", tags=["auth"])

PREFIX = "/v1/auth/oidc"
UI_LANDING = "/#/sso"
SSO_ACTOR = audit.Actor("sso")
NO_STORE = {"Cache-Control": "no-store", "Referrer-Policy": "no-referrer"}
_ERRORS: dict[int, type[APIError]] = {
    400: InvalidRequestError,
    401: AuthenticationError,
    403: PermissionDeniedError,
    503: ServiceUnavailableError,
}


class SsoConfig(BaseModel):
    enabled: bool
    button_label: str | None
    login_url: str | None
    password_login_enabled: bool


def _sso(request: Request, state: StateDep) -> SingleSignOn | None:
    """Built once per app (the provider's metadata and keys are cached in it)."""
    if not hasattr(request.app.state, "oidc"):
        request.app.state.oidc = SingleSignOn.from_settings(state.settings)
    sso: SingleSignOn | None = request.app.state.oidc
    return sso


def _required(request: Request, state: StateDep) -> SingleSignOn:
    sso = _sso(request, state)
    if sso is None:
        raise NotFoundError("Single sign-on is not configured on this server.")
    return sso


def _api_error(exc: SsoError) -> APIError:
    return _ERRORS.get(exc.status, AuthenticationError)(exc.message, code=exc.reason)


@router.get("", response_model=SsoConfig)
@public
async def sso_config(request: Request, state: StateDep) -> SsoConfig:
    sso = _sso(request, state)
    return SsoConfig(
        enabled=sso is not None,
        button_label=state.settings.oidc_button_label if sso else None,
        login_url=f"{PREFIX}/login" if sso else None,
        password_login_enabled=state.settings.password_login_enabled,
    )


@router.get("/login", status_code=302, response_class=RedirectResponse)
@public
async def sso_login(request: Request, state: StateDep) -> RedirectResponse:
    sso = _required(request, state)
    try:
        url, flow = await sso.begin()
    except SsoError as exc:
        raise _api_error(exc) from None
    response = RedirectResponse(url, status_code=302, headers=NO_STORE)
    # Lax: the provider's redirect back is a cross-site top-level GET, which Lax allows.
    response.set_cookie(
        STATE_COOKIE,
        flow,
        max_age=int(STATE_TTL.total_seconds()),
        path=f"{PREFIX}/callback",
        secure=sso.secure_cookies,
        httponly=True,
        samesite="lax",
    )
    return response


@router.get("/callback", status_code=303, response_class=RedirectResponse)
@public
async def sso_callback(
    request: Request, db: DbSession, auth: AuthDep, state: StateDep
) -> RedirectResponse:
    sso = _required(request, state)
    try:
        identity = await sso.finish(request.cookies.get(STATE_COOKIE), dict(request.query_params))
        user = await auth.users.by_email(db, identity.email)
        if user is not None and not user.is_active:
            raise SsoError("account_inactive", "This account is deactivated.", 403)
    except SsoError as exc:
        await record_refusal(request, state, None, {"method": "oidc", "reason": exc.reason})
        raise _api_error(exc) from None
    if user is None:
        user = await auth.users.create_external(
            db, identity.email, tier=sso.tier_for(identity), display_name=identity.name
        )
        after = audit.changes(user, audit.USER_FIELDS)
        await audit.record(db, SSO_ACTOR, "user.created", user, after=after, request=request)
    elif sso.tier_claim and user.tier != (tier := sso.tier_for(identity)):
        before = {"tier": user.tier}
        user.tier = tier
        await audit.record(
            db,
            SSO_ACTOR,
            "user.updated",
            user,
            before=before,
            after={"tier": tier},
            request=request,
        )
        auth.authenticator.forget(db)  # cached API keys carry the old tier
    await _join_teams(db, sso, identity, user, request)
    login = {"method": "oidc", "issuer": identity.issuer, "subject": identity.subject}
    await audit.record(db, user, "auth.login", user, after=login, request=request)
    pair = await auth.tokens.issue_pair(db, user.id)
    response = RedirectResponse(UI_LANDING, status_code=303, headers=NO_STORE)
    response.delete_cookie(STATE_COOKIE, path=f"{PREFIX}/callback")
    response.set_cookie(
        HANDOFF_COOKIE,
        pair.refresh_token,
        max_age=HANDOFF_TTL_S,
        path=f"{PREFIX}/session",
        secure=sso.secure_cookies,
        httponly=True,
        samesite="lax",
    )
    return response


async def _join_teams(
    db: DbSession, sso: SingleSignOn, identity: Identity, user: User, request: Request
) -> None:
    """Memberships in the existing teams the teams claim names (teams are made by admins;
    a name without a team is ignored, and memberships are never removed here)."""
    names = sso.team_names(identity)
    if not names:
        return
    teams = (await db.execute(select(Team).where(Team.name.in_(names[:100])))).scalars()
    member_of = set(
        (await db.execute(select(TeamMember.team_id).where(TeamMember.user_id == user.id)))
        .scalars()
        .all()
    )
    for team in teams:
        if team.id in member_of:
            continue
        db.add(TeamMember(team_id=team.id, user_id=user.id, role="member"))
        await db.flush()
        await audit.record(
            db,
            SSO_ACTOR,
            "team.member_added",
            team,
            after={"user_id": user.id, "role": "member", "via": "oidc"},
            request=request,
        )


@router.post("/session", response_model=TokenResponse)
@public
async def sso_session(
    request: Request,
    response: Response,
    db: DbSession,
    auth: AuthDep,
    state: StateDep,
) -> TokenResponse:
    _required(request, state)
    # A custom header: a cross-site page cannot send it without a CORS preflight we refuse.
    if request.headers.get("x-requested-with") != "llm-api":
        raise InvalidRequestError("Send X-Requested-With: llm-api.", code="missing_header")
    raw = request.cookies.get(HANDOFF_COOKIE)
    response.delete_cookie(HANDOFF_COOKIE, path=f"{PREFIX}/session")
    response.headers.update(NO_STORE)
    if not raw:
        raise InvalidRequestError("No single sign-on login to collect.", code="no_sso_login")
    try:
        user_id, pair = await auth.tokens.rotate(db, raw)
    except RefreshTokenReusedError as exc:
        await audit.record(
            db,
            audit.ANONYMOUS,
            "auth.refresh_token_reused",
            audit.Target("user", exc.user_id),
            after={"session_revoked": exc.family_id, "via": "oidc"},
            request=request,
        )
        raise
    user = await auth.users.get(db, user_id)
    if user is None or not user.is_active:
        raise AuthenticationError("Invalid or expired refresh token.")
    return TokenResponse(
        access_token=pair.access_token,
        expires_in=pair.expires_in,
        refresh_token=pair.refresh_token,
    )
