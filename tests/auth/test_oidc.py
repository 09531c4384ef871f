"""Single sign-on over HTTP against a real OpenID Connect provider on loopback
(tests/oidc_support.py): the whole code + PKCE flow, what the account gets (created at first
sign-in, tier and teams from claims), and the refusals: bad or missing state, a forged flow
cookie, a disallowed or unverified email, a provider denial, a deactivated account, password
login turned off, SSO not configured. The browser flow is in tests/test_sso_browser.py."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
import yaml

from llm_api.db.tables import Team, TeamMember
from tests.auth.conftest import AuthEnv
from tests.conftest import running_app
from tests.conftest import test_settings as settings_for
from tests.oidc_support import Provider, oidc_provider

REDIRECT_URI = "http://127.0.0.1:8000/v1/auth/oidc/callback"


@pytest.fixture(scope="module")
def provider() -> Iterator[Provider]:
    with oidc_provider() as p:
        yield p


@pytest.fixture(scope="module")
async def sso_app(
    provider: Provider, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Any]:
    tmp = tmp_path_factory.mktemp("sso")
    # No local model to load: accounts are what these tests are about.
    models = tmp / "models.yaml"
    models.write_text(
        yaml.safe_dump(
            {"models": [{"id": "up", "backend": "openai", "base_url": "http://127.0.0.1:9/v1"}]}
        )
    )
    settings = settings_for(
        tmp,
        models_file=models,
        warmup=False,
        oidc_issuer_url=provider.issuer,
        oidc_client_id="llm-api-test",
        oidc_client_secret="client-secret-" + "y" * 20,
        oidc_redirect_uri=REDIRECT_URI,
        oidc_allowed_email_domains=["example.org"],
        oidc_tier_claim="groups",
        oidc_tier_map={"llm-paid": "paid"},
        oidc_teams_claim="groups",
        oidc_button_label="Sign in with Example SSO",
        password_login_enabled=False,
    )
    async with running_app(settings) as app:
        async with app.state.llm_api.db.sessions.begin() as db:
            db.add(Team(id="team-research", name="research"))
        yield app


@pytest.fixture
async def http(sso_app: Any) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=sso_app)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as c:
        yield c


def _cookie(response: httpx.Response, name: str) -> tuple[str, str]:
    """(value, the whole Set-Cookie header) of one cookie a response sets."""
    for header in response.headers.get_list("set-cookie"):
        if header.startswith(name + "="):
            return header.split(";", 1)[0].split("=", 1)[1], header
    raise AssertionError(f"no {name} cookie in {response.headers.get_list('set-cookie')}")


async def _authorize(provider: Provider, url: str, sub: str) -> dict[str, str]:
    """The user picks `sub` on the provider's page; returns the callback's query."""
    assert url.startswith(provider.issuer + "/")
    async with httpx.AsyncClient() as browser:
        r = await browser.post(url, data={"sub": sub})
    assert r.status_code == 302, r.text
    location = r.headers["location"]
    assert location.startswith(REDIRECT_URI + "?")
    return {k: v[0] for k, v in parse_qs(urlsplit(location).query).items()}


async def _start(http: httpx.AsyncClient) -> tuple[str, str]:
    r = await http.get("/v1/auth/oidc/login")
    assert r.status_code == 302
    flow, _ = _cookie(r, "llm_api_oidc")
    return r.headers["location"], flow


async def _sign_in(http: httpx.AsyncClient, provider: Provider, sub: str) -> httpx.Response:
    url, flow = await _start(http)
    query = await _authorize(provider, url, sub)
    return await http.get(
        "/v1/auth/oidc/callback", params=query, headers={"Cookie": f"llm_api_oidc={flow}"}
    )


async def _collect(http: httpx.AsyncClient, callback: httpx.Response) -> httpx.Response:
    handoff, _ = _cookie(callback, "llm_api_sso")
    return await http.post(
        "/v1/auth/oidc/session",
        headers={"Cookie": f"llm_api_sso={handoff}", "X-Requested-With": "llm-api"},
    )


async def _audit(sso_app: Any, **params: Any) -> list[dict[str, Any]]:
    from llm_api.services import audit

    async with sso_app.state.llm_api.db.sessions() as db:
        rows, _ = await audit.search(db, audit.Filters(**params), 50)
    return [
        {"action": r.action, "actor": r.actor, "target_id": r.target_id, "after": r.after}
        for r in rows
    ]


async def test_sign_in_creates_the_account_and_issues_our_tokens(
    http: httpx.AsyncClient, provider: Provider, sso_app: Any
) -> None:
    options = (await http.get("/v1/auth/oidc")).json()
    assert options == {
        "enabled": True,
        "button_label": "Sign in with Example SSO",
        "login_url": "/v1/auth/oidc/login",
        "password_login_enabled": False,
    }
    sub = f"ann-{uuid.uuid4().hex[:6]}"
    email = f"{sub}@Example.org"
    provider.set_user(
        sub, email=email, email_verified=True, name="Ann", groups=["llm-paid", "research", "nope"]
    )
    r = await http.get("/v1/auth/oidc/login", headers={"Host": "evil.example"})
    assert r.status_code == 302 and r.headers["cache-control"] == "no-store"
    query = parse_qs(urlsplit(r.headers["location"]).query)
    # The redirect URI is the configured one whatever Host the request names; PKCE S256 and a
    # nonce are asked for.
    assert query["redirect_uri"] == [REDIRECT_URI]
    assert query["code_challenge_method"] == ["S256"] and query["code_challenge"][0]
    assert query["nonce"][0] and query["state"][0] and query["scope"] == ["openid email profile"]
    _, header = _cookie(r, "llm_api_oidc")
    assert "HttpOnly" in header and "samesite=lax" in header.lower()
    assert "Path=/v1/auth/oidc/callback" in header

    callback = await _sign_in(http, provider, sub)
    assert callback.status_code == 303, callback.text
    assert callback.headers["location"] == "/#/sso"  # always the UI; no return URL is read
    handoff, header = _cookie(callback, "llm_api_sso")
    assert handoff.startswith("rt-llmapi-") and "HttpOnly" in header
    assert "Path=/v1/auth/oidc/session" in header
    assert provider.recorder.pkce_ok()  # the code was redeemed with the matching verifier

    # Without the custom header (what a cross-site form could send) nothing is handed over.
    refused = await http.post("/v1/auth/oidc/session", headers={"Cookie": f"llm_api_sso={handoff}"})
    assert refused.status_code == 400
    tokens = await _collect(http, callback)
    assert tokens.status_code == 200, tokens.text
    body = tokens.json()
    assert set(body) == {"access_token", "token_type", "expires_in", "refresh_token"}
    me = await http.get("/v1/users/me", headers={"Authorization": f"Bearer {body['access_token']}"})
    assert me.status_code == 200
    info = me.json()
    assert info["email"] == email.lower() and info["tier"] == "paid" and info["role"] == "user"
    assert info["display_name"] == "Ann"
    # Our refresh tokens work as for a password login.
    again = await http.post("/v1/auth/refresh", json={"refresh_token": body["refresh_token"]})
    assert again.status_code == 200
    # The handed-over token was rotated on collection: a second collection is a reuse.
    assert (await _collect(http, callback)).status_code == 401

    async with sso_app.state.llm_api.db.sessions() as db:
        member = await db.get(TeamMember, ("team-research", info["id"]))
    assert member is not None and member.role == "member"
    events = await _audit(sso_app, target=info["id"])
    assert [e["action"] for e in events] == [
        "auth.refresh_token_reused",
        "auth.login",
        "user.created",
    ]
    assert events[1]["after"] == {"method": "oidc", "issuer": provider.issuer, "subject": sub}
    joined = await _audit(sso_app, action="team.member_added", target="team-research")
    assert joined[0]["after"]["user_id"] == info["id"]
    # No password exists for this account (and password sign-in is off anyway).
    pw = await http.post("/v1/auth/token", data={"username": email, "password": "!sso"})
    assert pw.status_code == 403


async def test_tier_follows_the_claim_at_each_sign_in(
    http: httpx.AsyncClient, provider: Provider, sso_app: Any
) -> None:
    sub = f"bob-{uuid.uuid4().hex[:6]}"
    provider.set_user(sub, email=f"{sub}@example.org", email_verified=True, groups=["llm-paid"])
    first = await _collect(http, await _sign_in(http, provider, sub))
    token = first.json()["access_token"]
    me = (await http.get("/v1/users/me", headers={"Authorization": f"Bearer {token}"})).json()
    assert me["tier"] == "paid"
    provider.set_user(sub, email=f"{sub}@example.org", email_verified=True, groups=[])
    second = await _collect(http, await _sign_in(http, provider, sub))
    token = second.json()["access_token"]
    me = (await http.get("/v1/users/me", headers={"Authorization": f"Bearer {token}"})).json()
    assert me["tier"] == "free"
    changed = await _audit(sso_app, target=me["id"], action="user.updated")
    assert changed[0]["after"] == {"tier": "free"} and changed[0]["actor"] == "sso"


@pytest.mark.parametrize(
    ("claims", "reason"),
    [
        ({"email": "eve@elsewhere.com", "email_verified": True}, "domain_not_allowed"),
        ({"email": "eve@example.org.evil.com", "email_verified": True}, "domain_not_allowed"),
        ({"email": "eve@example.org", "email_verified": False}, "email_unverified"),
        ({"email": "eve@example.org"}, "email_unverified"),
        ({"name": "No Email"}, "no_email"),
    ],
)
async def test_refused_identities_get_403_and_no_account(
    http: httpx.AsyncClient, provider: Provider, sso_app: Any, claims: dict[str, Any], reason: str
) -> None:
    sub = f"eve-{uuid.uuid4().hex[:6]}"
    provider.set_user(sub, **claims)
    r = await _sign_in(http, provider, sub)
    assert r.status_code == 403, r.text
    assert r.json()["error"]["code"] == reason
    assert "llm_api_sso" not in r.headers.get("set-cookie", "")
    async with sso_app.state.llm_api.db.sessions() as db:
        users = await sso_app.state.llm_api.auth.users.count(db)
        refusals = await _audit(sso_app, action="auth.login_failed")
    assert refusals[0]["after"]["reason"] == reason and refusals[0]["after"]["method"] == "oidc"
    assert users >= 1


async def test_state_must_match_its_signed_cookie(
    http: httpx.AsyncClient, provider: Provider
) -> None:
    sub = f"sam-{uuid.uuid4().hex[:6]}"
    provider.set_user(sub, email=f"{sub}@example.org", email_verified=True)
    url, flow = await _start(http)
    query = await _authorize(provider, url, sub)
    _, other_flow = await _start(http)  # a flow cookie of another attempt
    header, payload, sig = flow.split(".")
    forged = f"{header}.{payload}.{sig[:-2]}{'AA' if sig[-2:] != 'AA' else 'BB'}"
    cases = [
        ({**query, "state": "not-the-state"}, flow),  # the state was swapped
        (query, None),  # no cookie: a callback this browser never started
        (query, other_flow),  # login CSRF: someone else's code into this browser
        (query, forged),  # a cookie not signed by us
    ]
    for params, cookie in cases:
        headers = {"Cookie": f"llm_api_oidc={cookie}"} if cookie else {}
        r = await http.get("/v1/auth/oidc/callback", params=params, headers=headers)
        assert r.status_code == 400, (params, r.text)
        assert r.json()["error"]["code"] == "invalid_state"
    # The genuine pair still works once, and a replayed code is refused by the provider.
    ok = await http.get(
        "/v1/auth/oidc/callback", params=query, headers={"Cookie": f"llm_api_oidc={flow}"}
    )
    assert ok.status_code == 303
    replay = await http.get(
        "/v1/auth/oidc/callback", params=query, headers={"Cookie": f"llm_api_oidc={flow}"}
    )
    assert replay.status_code == 401 and replay.json()["error"]["code"] == "token_rejected"


async def test_provider_denial_and_missing_code(
    http: httpx.AsyncClient, provider: Provider
) -> None:
    url, flow = await _start(http)
    async with httpx.AsyncClient() as browser:
        r = await browser.post(url, data={"action": "deny"})
    query = {k: v[0] for k, v in parse_qs(urlsplit(r.headers["location"]).query).items()}
    assert query["error"] == "access_denied"
    cookie = {"Cookie": f"llm_api_oidc={flow}"}
    state = parse_qs(urlsplit(url).query)["state"][0]
    # This provider leaves the state out of its denial: such an answer cannot be matched to a
    # sign-in attempt, so it is refused as one (400), as is a denial for another attempt.
    unmatched = await http.get("/v1/auth/oidc/callback", params=query, headers=cookie)
    assert unmatched.status_code == 400
    denied = await http.get(
        "/v1/auth/oidc/callback", params={**query, "state": state}, headers=cookie
    )
    assert denied.status_code == 401 and denied.json()["error"]["code"] == "provider_denied"
    bare = await http.get("/v1/auth/oidc/callback", params={"state": state}, headers=cookie)
    assert bare.status_code == 400 and bare.json()["error"]["code"] == "invalid_request"


async def test_deactivated_account_cannot_sign_in(
    http: httpx.AsyncClient, provider: Provider, sso_app: Any
) -> None:
    sub = f"dan-{uuid.uuid4().hex[:6]}"
    provider.set_user(sub, email=f"{sub}@example.org", email_verified=True)
    tokens = (await _collect(http, await _sign_in(http, provider, sub))).json()
    me = (
        await http.get(
            "/v1/users/me", headers={"Authorization": f"Bearer {tokens['access_token']}"}
        )
    ).json()
    state = sso_app.state.llm_api
    async with state.db.sessions.begin() as db:
        user = await state.auth.users.get(db, me["id"])
        user.is_active = False
    r = await _sign_in(http, provider, sub)
    assert r.status_code == 403 and r.json()["error"]["code"] == "account_inactive"


async def test_password_login_can_be_turned_off(http: httpx.AsyncClient) -> None:
    r = await http.post("/v1/auth/token", data={"username": "a@example.org", "password": "x" * 12})
    assert r.status_code == 403
    assert r.json()["error"]["code"] == "password_login_disabled"
    # Nothing to collect without a sign-in.
    r = await http.post("/v1/auth/oidc/session", headers={"X-Requested-With": "llm-api"})
    assert r.status_code == 400


async def test_without_sso_the_routes_are_404(env: AuthEnv) -> None:
    options = (await env.http.get("/v1/auth/oidc")).json()
    assert options["enabled"] is False and options["password_login_enabled"] is True
    for method, path in (
        ("GET", "/v1/auth/oidc/login"),
        ("GET", "/v1/auth/oidc/callback?code=x&state=y"),
        ("POST", "/v1/auth/oidc/session"),
    ):
        r = await env.http.request(method, path)
        assert r.status_code == 404, (path, r.text)


def test_settings_refuse_an_incomplete_or_insecure_provider(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="CLIENT_ID"):
        settings_for(tmp_path, oidc_issuer_url="https://idp.example.com")
    with pytest.raises(ValueError, match="https"):
        settings_for(
            tmp_path,
            oidc_issuer_url="http://idp.example.com",
            oidc_client_id="x",
            oidc_redirect_uri="https://api.example.com/v1/auth/oidc/callback",
        )


async def test_an_unreachable_provider_is_a_503(tmp_path: Path) -> None:
    from llm_api.services.auth.oidc import SingleSignOn, SsoError

    settings = settings_for(
        tmp_path,
        oidc_issuer_url="http://127.0.0.1:9",  # nothing listens on the discard port
        oidc_client_id="x",
        oidc_redirect_uri=REDIRECT_URI,
    )
    sso = SingleSignOn(settings)
    with pytest.raises(SsoError) as refused:
        await sso.begin()
    assert refused.value.status == 503 and refused.value.reason == "provider_unreachable"
