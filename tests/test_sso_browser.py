"""Single sign-on in headless Chromium, end to end: the sign-in page shows the provider's button
(and no password form: password sign-in is off), the button leads to a real OpenID Connect
provider on loopback (oidc-provider-mock, tests/oidc_support.py), the user picks an identity
there, and the browser comes back signed in with our own tokens; a reload keeps the session.
Screenshots go to test-artifacts/web/.

Skipped locally when Chromium is missing; in CI (CI=true) its absence is a failure.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import yaml

from tests.conftest import IN_CI, LiveServer, free_port, start_live_server
from tests.oidc_support import Provider, oidc_provider

pytestmark = [pytest.mark.browser]

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts" / "web"
BUTTON = "Sign in with Example SSO"

if not CHROMIUM.exists():
    if IN_CI:
        raise RuntimeError("CI needs /usr/bin/chromium (apt-get install chromium chromium-driver)")
    pytest.skip("/usr/bin/chromium is not installed", allow_module_level=True)

try:
    from playwright.async_api import Browser, async_playwright, expect
except ImportError:  # pragma: no cover - the dev lock has playwright
    if IN_CI:
        raise
    pytest.skip("playwright is not installed", allow_module_level=True)

from tests.test_web_ui import CHROMIUM_ARGS  # noqa: E402 - after the skips above


@pytest.fixture(scope="module")
def provider() -> Iterator[Provider]:
    with oidc_provider() as p:
        yield p


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, provider: Provider) -> Iterator[LiveServer]:
    data_dir = tmp_path_factory.mktemp("sso-browser")
    models = data_dir / "models.yaml"  # no local model: sign-in is what this is about
    up = {"id": "up", "backend": "openai", "base_url": "http://127.0.0.1:9/v1"}
    models.write_text(yaml.safe_dump({"models": [up]}))
    port = free_port()
    env = {
        "LLM_API_MODELS_FILE": str(models),
        "LLM_API_OIDC_ISSUER_URL": provider.issuer,
        "LLM_API_OIDC_CLIENT_ID": "llm-api-browser",
        "LLM_API_OIDC_CLIENT_SECRET": "browser-secret-" + "z" * 20,
        # The server's own address, as registered at a real provider.
        "LLM_API_OIDC_REDIRECT_URI": f"http://127.0.0.1:{port}/v1/auth/oidc/callback",
        "LLM_API_OIDC_ALLOWED_EMAIL_DOMAINS": "example.org",
        "LLM_API_OIDC_TIER_CLAIM": "groups",
        "LLM_API_OIDC_TIER_MAP": '{"llm-paid": "paid"}',
        "LLM_API_OIDC_BUTTON_LABEL": BUTTON,
        "LLM_API_PASSWORD_LOGIN_ENABLED": "false",
    }
    live = start_live_server(data_dir, env=env, port=port)
    yield live
    live.stop()


@pytest.fixture(scope="module")
async def browser() -> AsyncIterator[Browser]:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    async with async_playwright() as pw:
        chromium = await pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield chromium
        await chromium.close()


async def test_sign_in_with_the_provider_in_the_browser(
    browser: Browser, server: LiveServer, provider: Provider
) -> None:
    sub = f"carol-{uuid.uuid4().hex[:6]}"
    email = f"{sub}@example.org"
    provider.set_user(sub, email=email, email_verified=True, name="Carol", groups=["llm-paid"])
    context = await browser.new_context(base_url=server.base_url)
    page = await context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    try:
        await page.goto("/#/account")
        button = page.locator("#sso-button")
        await expect(button).to_have_text(BUTTON)
        await expect(page.locator("#password-form")).to_have_count(0)  # password sign-in is off
        await expect(page.locator("#key-form")).to_be_visible()
        await page.screenshot(path=str(ARTIFACTS / "sso-signin.png"), full_page=True)

        await button.click()
        # The provider's own page, on its own origin.
        await page.wait_for_url(f"{provider.issuer}/oauth2/authorize*")
        await page.fill("input[name=sub]", sub)
        await page.click("button[type=submit]:has-text('Authorize')")

        # Back on the server's page, signed in, on the page asked for before signing in.
        await expect(page.locator("#who-name")).to_have_text(email, timeout=20_000)
        assert page.url.startswith(server.base_url) and page.url.endswith("#/account")
        assert provider.recorder.pkce_ok()
        # The hand-over cookie was consumed; nothing else of ours is a cookie.
        names = {c["name"] for c in await context.cookies()}
        assert "llm_api_sso" not in names and "llm_api_oidc" not in names
        refresh = await page.evaluate("sessionStorage.getItem('llm-api.refresh-token')")
        assert refresh.startswith("rt-llmapi-")
        await page.screenshot(path=str(ARTIFACTS / "sso-signed-in.png"), full_page=True)

        # A reload keeps the session (the refresh token in this tab), as after a password login.
        await page.reload()
        await expect(page.locator("#who-name")).to_have_text(email)
        # The account came from the claims: the paid tier.
        tier = await page.evaluate(
            """async () => {
                const r = await fetch('/v1/auth/refresh', {method: 'POST',
                  headers: {'Content-Type': 'application/json'},
                  body: JSON.stringify({refresh_token:
                    sessionStorage.getItem('llm-api.refresh-token')})});
                const t = await r.json();
                sessionStorage.setItem('llm-api.refresh-token', t.refresh_token);
                const me = await fetch('/v1/users/me',
                  {headers: {Authorization: 'Bearer ' + t.access_token}});
                return (await me.json()).tier;
            }"""
        )
        assert tier == "paid"
        assert errors == []
        # Nothing of the exchange reached the server's log: no code, state, token or cookie.
        log = server.log.read_text()
        assert "rt-llmapi-" not in log and "code=" not in log and "llm_api_sso" not in log
        assert "eyJ" not in log  # no JWT (ID token, access token, flow cookie)
    finally:
        await context.close()


async def test_a_refused_identity_comes_back_signed_out(
    browser: Browser, server: LiveServer, provider: Provider
) -> None:
    sub = f"mallory-{uuid.uuid4().hex[:6]}"
    provider.set_user(sub, email=f"{sub}@elsewhere.com", email_verified=True)
    context = await browser.new_context(base_url=server.base_url)
    page = await context.new_page()
    try:
        await page.goto("/")
        await page.click("#sso-button")
        await page.wait_for_url(f"{provider.issuer}/oauth2/authorize*")
        await page.fill("input[name=sub]", sub)
        async with page.expect_response("**/v1/auth/oidc/callback*") as answer:
            await page.click("button[type=submit]:has-text('Authorize')")
        response = await answer.value
        assert response.status == 403
        assert (await response.json())["error"]["code"] == "domain_not_allowed"
        await page.goto("/")
        await expect(page.locator("#sso-button")).to_be_visible()
        assert await page.evaluate("sessionStorage.getItem('llm-api.refresh-token')") is None
    finally:
        await context.close()
