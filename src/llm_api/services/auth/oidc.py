"""Single sign-on with OpenID Connect: authorization code flow with PKCE (S256), through Authlib.

Any standard provider works (Keycloak, Okta, Entra ID, Google, Dex): its endpoints and keys are
read from `<issuer>/.well-known/openid-configuration` (cached; the key set is fetched again when
a token names an unknown key). The flow is stateless on our side, so any worker or replica can
serve the callback: `begin` returns the provider URL and a short-lived signed cookie value that
holds the state, the nonce and the PKCE verifier; `finish` checks the state against the cookie,
exchanges the code with the verifier and validates the ID token (signature, issuer, audience,
expiry, nonce; Authlib's `parse_id_token`). The redirect URI is the configured one, never taken
from the request. What the provider says about the user becomes a `Identity`; the caller
(api/v1/endpoints/oidc.py) maps it to an account and issues our own tokens.
"""

from __future__ import annotations

import hmac
import secrets
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import httpx
import jwt
from authlib.integrations.base_client import OAuthError
from authlib.integrations.starlette_client import OAuth, StarletteOAuth2App
from joserfc.errors import JoseError

from llm_api.core.config import Settings
from llm_api.db.tables import utcnow
from llm_api.services.users import Tier

try:  # Authlib's HTTP client is httpx2's when that is installed, else httpx's
    import httpx2

    _HTTP_ERRORS: tuple[type[Exception], ...] = (httpx.HTTPError, httpx2.HTTPError)
except ImportError:  # pragma: no cover - depends on the environment
    _HTTP_ERRORS = (httpx.HTTPError,)

STATE_COOKIE = "llm_api_oidc"  # state, nonce, PKCE verifier: from /login to /callback
HANDOFF_COOKIE = "llm_api_sso"  # our refresh token: from /callback to POST /session
STATE_TTL = timedelta(minutes=10)
HANDOFF_TTL_S = 120
_STATE_AUDIENCE = "llm-api-oidc-state"  # our JWTs for other purposes never pass as this one


class SsoError(Exception):
    """A refused sign-in. `reason` is a short code for the audit log and the error body."""

    def __init__(self, reason: str, message: str, status: int = 401) -> None:
        super().__init__(message)
        self.reason, self.message, self.status = reason, message, status


@dataclass(frozen=True, slots=True)
class Identity:
    """The verified ID token (and userinfo) claims we use."""

    issuer: str
    subject: str
    email: str
    name: str | None
    claims: dict[str, Any] = field(repr=False)

    def values(self, claim: str | None) -> list[str]:
        """A claim as a list of strings (a string, a list of strings, or absent)."""
        if not claim:
            return []
        value = self.claims.get(claim)
        if isinstance(value, str):
            return [value]
        if isinstance(value, list):
            return [v for v in value if isinstance(v, str)]
        return []


class SingleSignOn:
    def __init__(self, settings: Settings) -> None:
        assert settings.oidc_issuer_url and settings.oidc_client_id and settings.oidc_redirect_uri
        self.issuer = settings.oidc_issuer_url.rstrip("/")
        self.redirect_uri = settings.oidc_redirect_uri
        self.secure_cookies = self.redirect_uri.startswith("https://")
        self.allowed_domains = frozenset(d.lower() for d in settings.oidc_allowed_email_domains)
        self.tier_claim, self.tier_map = settings.oidc_tier_claim, settings.oidc_tier_map
        self.teams_claim = settings.oidc_teams_claim
        self._signing_key = settings.jwt_secret
        secret = settings.oidc_client_secret
        client_kwargs: dict[str, Any] = {
            "scope": settings.oidc_scopes,
            "code_challenge_method": "S256",
            "timeout": 10.0,
        }
        if secret is None:  # a public client: PKCE alone
            client_kwargs["token_endpoint_auth_method"] = "none"  # noqa: S105 - a method name
        registry = OAuth()
        self.client: StarletteOAuth2App = registry.register(
            name="sso",
            client_id=settings.oidc_client_id,
            client_secret=secret.get_secret_value() if secret else None,
            server_metadata_url=f"{self.issuer}/.well-known/openid-configuration",
            client_kwargs=client_kwargs,
        )

    @classmethod
    def from_settings(cls, settings: Settings) -> SingleSignOn | None:
        return cls(settings) if settings.oidc_issuer_url else None

    # --- /login ---------------------------------------------------------------------------

    async def begin(self) -> tuple[str, str]:
        """(the provider's authorization URL, the state cookie's value)."""
        try:
            made = await self.client.create_authorization_url(
                self.redirect_uri, state=secrets.token_urlsafe(32), nonce=secrets.token_urlsafe(32)
            )
        except (*_HTTP_ERRORS, OAuthError, RuntimeError, ValueError) as exc:
            raise SsoError(
                "provider_unreachable", "The sign-in provider is unreachable.", 503
            ) from exc
        now = utcnow()
        cookie = jwt.encode(
            {
                "aud": _STATE_AUDIENCE,
                "iat": now,
                "exp": now + STATE_TTL,
                "state": made["state"],
                "nonce": made["nonce"],
                "cv": made["code_verifier"],
            },
            self._signing_key,
            algorithm="HS256",
        )
        return made["url"], cookie

    # --- /callback ------------------------------------------------------------------------

    def _flow(self, cookie: str | None, state: str | None) -> dict[str, Any]:
        if not cookie or not state:
            raise SsoError("invalid_state", "The sign-in attempt is unknown or expired.", 400)
        try:
            flow: dict[str, Any] = jwt.decode(
                cookie, self._signing_key, algorithms=["HS256"], audience=_STATE_AUDIENCE
            )
        except jwt.PyJWTError:
            raise SsoError(
                "invalid_state", "The sign-in attempt is unknown or expired.", 400
            ) from None
        if not hmac.compare_digest(str(flow.get("state", "")), state):
            raise SsoError("invalid_state", "The sign-in attempt does not match.", 400)
        return flow

    async def finish(self, cookie: str | None, params: dict[str, str]) -> Identity:
        """Check the callback against its cookie, redeem the code, validate the ID token."""
        flow = self._flow(cookie, params.get("state"))
        if "error" in params:
            raise SsoError("provider_denied", "The sign-in provider did not sign you in.", 401)
        code = params.get("code")
        if not code:
            raise SsoError("invalid_request", "The callback carries no authorization code.", 400)
        try:
            token = await self.client.fetch_access_token(
                redirect_uri=self.redirect_uri, code=code, code_verifier=flow["cv"]
            )
            claims = await self.client.parse_id_token(token, nonce=flow["nonce"])
        except (*_HTTP_ERRORS, OAuthError, JoseError, KeyError, ValueError, RuntimeError) as exc:
            raise SsoError(
                "token_rejected", "The sign-in provider's answer could not be verified.", 401
            ) from exc
        if claims is None:
            raise SsoError("token_rejected", "The provider returned no ID token.", 401)
        return self._identity(dict(claims))

    def _identity(self, claims: dict[str, Any]) -> Identity:
        email = claims.get("email")
        if not isinstance(email, str) or "@" not in email:
            raise SsoError("no_email", "The provider did not share an email address.", 403)
        # Only an address the provider has verified may name an account here.
        if claims.get("email_verified") is not True:
            raise SsoError("email_unverified", "Your email address is not verified.", 403)
        email = email.strip().lower()
        if email.rsplit("@", 1)[1] not in self.allowed_domains:
            raise SsoError("domain_not_allowed", "Your email domain may not sign in here.", 403)
        name = claims.get("name")
        return Identity(
            issuer=str(claims.get("iss", self.issuer)),
            subject=str(claims.get("sub", "")),
            email=email,
            name=name[:100] if isinstance(name, str) and name else None,
            claims=claims,
        )

    def tier_for(self, identity: Identity) -> Tier:
        """The highest tier any of the claim's values maps to; free without a match."""
        mapped = {self.tier_map[v] for v in identity.values(self.tier_claim) if v in self.tier_map}
        return "paid" if "paid" in mapped else "free"

    def team_names(self, identity: Identity) -> list[str]:
        return identity.values(self.teams_claim)
