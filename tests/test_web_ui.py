"""The web UI in headless Chromium (Debian's /usr/bin/chromium, driven by Playwright's async
API), against a live server with the real model. Screenshots go to test-artifacts/web/.

Skipped locally when Chromium is missing; in CI (CI=true) its absence is a failure.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml

from bench.stub_upstream import StubConfig, StubUpstream
from llm_api.services.llm.registry import builtin_registry
from tests.conftest import IN_CI, MODEL, LiveServer, start_live_server
from tests.web_support import PASSWORD, cli_create_user, login

pytestmark = [pytest.mark.browser, pytest.mark.model]

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts" / "web"
XSS = "<img src=x onerror=alert(1)>"
STUB_MODEL = "xss-stub"

if not CHROMIUM.exists():
    if IN_CI:
        raise RuntimeError("CI needs /usr/bin/chromium (apt-get install chromium chromium-driver)")
    pytest.skip("/usr/bin/chromium is not installed", allow_module_level=True)

try:
    from playwright.async_api import Browser, Dialog, Page, async_playwright, expect
except ImportError:  # pragma: no cover - the dev lock has playwright
    if IN_CI:
        raise
    pytest.skip("playwright is not installed", allow_module_level=True)


@dataclass
class Site:
    server: LiveServer
    data_dir: Path
    user: str
    admin: str

    @property
    def url(self) -> str:
        return self.server.base_url


@pytest.fixture(scope="module")
async def stub() -> AsyncIterator[StubUpstream]:
    """An upstream model whose whole reply is an XSS payload (the real model won't say it)."""
    upstream = await StubUpstream(StubConfig(tokens=3, token=XSS + " ")).start()
    yield upstream
    await upstream.stop()


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory, stub: StubUpstream) -> Any:
    data_dir = tmp_path_factory.mktemp("web-ui")
    local = builtin_registry().models[0].model_dump(exclude_unset=True)
    # A smaller batch than the default keeps the KV cache (and the test) light.
    local.pop("concurrency", None)
    local.update(slots=2, context_length=2048)
    models = {
        "models": [
            local,
            {"id": STUB_MODEL, "backend": "openai", "base_url": stub.base_url},
        ]
    }
    models_file = data_dir / "models.yaml"
    models_file.write_text(yaml.safe_dump(models))
    suffix = uuid.uuid4().hex[:6]
    user, admin = f"web-user-{suffix}@example.com", f"web-admin-{suffix}@example.com"
    env = {"LLM_API_MODELS_FILE": str(models_file), "LLM_API_RATE_LIMIT_ENABLED": "true"}
    server = start_live_server(data_dir, env=env)
    try:
        cli_create_user(data_dir, user)
        cli_create_user(data_dir, admin, admin=True)
        yield Site(server, data_dir, user, admin)
    finally:
        server.stop()


@pytest.fixture(scope="module")
async def browser() -> AsyncIterator[Browser]:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    async with async_playwright() as pw:
        chromium = await pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield chromium
        await chromium.close()


@dataclass
class Tab:
    page: Page
    dialogs: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    async def shot(self, name: str) -> None:
        await self.page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


@pytest.fixture
async def tab(browser: Browser, site: Site) -> AsyncIterator[Tab]:
    context = await browser.new_context(base_url=site.url, viewport={"width": 1280, "height": 800})
    page = await context.new_page()
    t = Tab(page)

    async def on_dialog(dialog: Dialog) -> None:
        t.dialogs.append(dialog.message)
        await dialog.dismiss()

    page.on("dialog", on_dialog)
    page.on("pageerror", lambda exc: t.errors.append(str(exc)))
    page.on(
        "console",
        lambda msg: t.errors.append(msg.text) if msg.type == "error" else None,
    )
    yield t
    await context.close()


async def sign_in(tab: Tab, email: str) -> None:
    page = tab.page
    await page.goto("/")
    await page.fill("#email", email)
    await page.fill("#password", PASSWORD)
    await page.click("#signin-submit")
    await expect(page.locator("#composer")).to_be_visible()
    await expect(page.locator("#who-name")).to_have_text(email)


async def choose(tab: Tab, model: str, max_tokens: int, temperature: float = 0.0) -> None:
    page = tab.page
    await expect(page.locator(f'#model option[value="{model}"]')).to_have_count(1)
    await page.select_option("#model", model)
    await page.fill("#max-tokens", str(max_tokens))
    await page.fill("#temperature", str(temperature))


async def send(tab: Tab, text: str) -> None:
    await tab.page.fill("#prompt", text)
    await tab.page.click("#send")


def last_reply(tab: Tab) -> Any:
    return tab.page.locator("li.msg.assistant").last


async def test_sign_in_and_stream_a_reply(tab: Tab, site: Site) -> None:
    page = tab.page
    await sign_in(tab, site.user)
    await choose(tab, MODEL, max_tokens=60)
    await send(tab, "Name three colors of the rainbow.")
    reply = last_reply(tab)
    # Tokens appear while the reply is still streaming (no data-done yet).
    await page.wait_for_function(
        """() => { const r = [...document.querySelectorAll('li.msg.assistant')].pop();
                   return r && !r.dataset.done
                       && r.querySelector('.content').textContent.length > 0; }""",
        timeout=90_000,
    )
    await expect(reply).to_have_attribute("data-done", "true", timeout=90_000)
    text = await reply.locator(".content").text_content()
    meta = await reply.locator(".meta").text_content()
    assert text and text.strip()
    assert meta is not None and "TTFT" in meta and "completion" in meta, meta
    assert f"{MODEL}" in meta and "finish:" in meta
    await tab.shot("playground-reply")

    # The conversation survives a reload, and so does the session (refresh token, this tab).
    await page.reload()
    await expect(page.locator("li.msg.assistant .content").last).to_have_text(text)
    await expect(page.locator("#who-name")).to_have_text(site.user)
    storage = await page.evaluate(
        "() => ({local: JSON.stringify(localStorage), session: JSON.stringify(sessionStorage)})"
    )
    # The JWT access token is held in memory only; no storage holds one.
    assert "eyJ" not in storage["local"] and "eyJ" not in storage["session"]
    assert "llm-api.refresh-token" in storage["session"]
    assert "token" not in storage["local"].replace("_tokens", "")
    assert tab.dialogs == [] and tab.errors == []


async def test_stop_cancels_generation_on_the_server(tab: Tab, site: Site) -> None:
    page = tab.page
    async with httpx.AsyncClient(base_url=site.url, timeout=30) as http:
        admin = {"Authorization": f"Bearer {(await login(http, site.admin))['access_token']}"}

        async def running() -> int:
            summary = (await http.get("/v1/admin/summary", headers=admin)).json()
            return int(summary["requests_running"])

        await sign_in(tab, site.user)
        await choose(tab, MODEL, max_tokens=2000, temperature=1.0)
        await send(tab, "Write a very long story about a dragon, with many chapters.")
        reply = last_reply(tab)
        await page.wait_for_function(
            """() => [...document.querySelectorAll('li.msg.assistant')].pop()
                     .querySelector('.content').textContent.length > 40""",
            timeout=90_000,
        )
        assert await running() == 1
        await page.click("#stop")
        await expect(reply).to_have_attribute("data-done", "true")
        meta = await reply.locator(".meta").text_content()
        assert meta is not None and "stopped" in meta and "finish:" not in meta
        stopped_text = await reply.locator(".content").text_content()
        # The server notices the closed connection and frees the slot within a second.
        for _ in range(50):
            if await running() == 0:
                break
            await asyncio.sleep(0.05)
        assert await running() == 0, "generation kept running after Stop"
    await asyncio.sleep(0.3)
    assert await reply.locator(".content").text_content() == stopped_text  # nothing more came
    await expect(page.locator("#send")).to_be_enabled()
    await tab.shot("playground-stopped")
    assert tab.dialogs == []


async def test_create_a_key_in_the_page_and_use_it_with_the_openai_sdk(tab: Tab, site: Site):
    page = tab.page
    await sign_in(tab, site.user)
    await page.click("#nav-account")
    name = f"sdk-{uuid.uuid4().hex[:6]}"
    await page.fill("#key-name", name)
    await page.fill("#key-models", MODEL)  # a model allow-list, set from the page
    await page.click("#create-key button[type=submit]")
    secret = (await page.locator("#new-key-value").text_content()) or ""
    assert secret.startswith("sk-")
    row = page.locator("#keys-table tr", has_text=name)
    await expect(row).to_have_count(1)
    assert secret not in ((await row.text_content()) or "")  # listed by prefix only
    await expect(row.locator("td.scopes")).to_have_text("inference")  # the default scope
    await expect(row.locator("td.models")).to_have_text(MODEL)
    await expect(row.locator("td.expires")).to_have_text("never")

    sdk = openai.AsyncOpenAI(base_url=f"{site.url}/v1", api_key=secret, max_retries=0)
    completion = await sdk.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=5
    )
    assert completion.choices[0].message.content is not None
    assert completion.usage is not None and completion.usage.completion_tokens >= 1

    # The account page shows usage as a chart (records are written in the background: reload
    # until this one is in) and the rate-limit standing, which counts the SDK's request.
    # Two charts: tokens, then spend (USD), each with its legend.
    legend = page.locator("#usage .legend li", has_text=MODEL).first
    for _ in range(20):
        await page.reload()
        await expect(page.locator("#usage svg.chart").first).to_be_visible()
        if await legend.count():
            break
        await asyncio.sleep(0.5)
    await expect(legend).to_be_visible()
    assert await page.locator("#usage rect.bar").count() >= 1
    await expect(page.locator("#usage svg.chart")).to_have_count(2)
    await expect(page.locator("#spend-total")).to_contain_text("$")
    rpm = page.locator("#limits-table tr", has_text="requests per minute")
    await expect(rpm).to_be_visible()
    cells = await rpm.locator("td").all_text_contents()
    assert int(cells[1]) >= 1 and int(cells[1]) + int(cells[2]) == int(cells[3]), cells
    await tab.shot("account")

    await row.locator("button.revoke").click()
    await expect(page.locator("#keys-table tr", has_text=name)).to_have_count(0)
    with pytest.raises(openai.AuthenticationError):
        await sdk.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=5
        )
    assert tab.dialogs == []


async def test_xss_in_a_reply_is_inert(tab: Tab, site: Site) -> None:
    page = tab.page
    await sign_in(tab, site.user)
    # 1. Streamed from a model: the stub upstream answers with the payload.
    await choose(tab, STUB_MODEL, max_tokens=16)
    await send(tab, "Say something nasty.")
    reply = last_reply(tab)
    await expect(reply).to_have_attribute("data-done", "true")
    content = await reply.locator(".content").text_content()
    assert content is not None and XSS in content
    # 2. From the stored conversation (rendered again at load).
    seeded = [
        {"role": "user", "content": "<script>alert(2)</script>"},
        {"role": "assistant", "content": f"{XSS}\n<svg onload=alert(3)>", "meta": {}},
    ]
    await page.evaluate(
        """extra => { const c = JSON.parse(localStorage.getItem('llm-api.conversation'));
                      c.messages.push(...extra);
                      localStorage.setItem('llm-api.conversation', JSON.stringify(c)); }""",
        seeded,
    )
    await page.reload()
    await expect(page.locator("li.msg.assistant .content").last).to_have_text(
        f"{XSS}\n<svg onload=alert(3)>"
    )
    await page.wait_for_timeout(500)
    assert await page.locator("#messages img, #messages svg, #messages script").count() == 0
    # 3. Even injected markup could not run script: the CSP forbids inline code.
    ran = await page.evaluate(
        """() => { const s = document.createElement('script');
                   s.textContent = 'window.__pwned = true'; document.body.append(s);
                   return window.__pwned === true; }"""
    )
    assert ran is False
    await tab.shot("xss-inert")
    assert tab.dialogs == []


async def test_admin_pages_refused_to_a_non_admin(tab: Tab, site: Site) -> None:
    page = tab.page
    await sign_in(tab, site.user)
    await expect(page.locator("#nav-admin")).to_have_count(0)  # no link for a user
    await page.goto("/#/admin")
    await expect(page.locator("#admin-refused")).to_be_visible()
    await expect(page.locator("#admin-refused")).to_contain_text("administrators")
    assert await page.locator("#users-table, #summary").count() == 0
    await tab.shot("admin-refused")

    async with httpx.AsyncClient(base_url=site.url, timeout=30) as http:
        user = {"Authorization": f"Bearer {(await login(http, site.user))['access_token']}"}
        for path in ["/v1/admin/summary", "/v1/admin/users", "/v1/admin/usage"]:
            assert (await http.get(path, headers=user)).status_code == 403, path


async def test_admin_pages_for_an_admin(tab: Tab, site: Site) -> None:
    page = tab.page
    team_name = f"team-{uuid.uuid4().hex[:6]}"
    async with httpx.AsyncClient(base_url=site.url, timeout=30) as http:
        admin = {"Authorization": f"Bearer {(await login(http, site.admin))['access_token']}"}
        made = await http.post("/v1/teams", json={"name": team_name}, headers=admin)
        assert made.status_code == 201, made.text
    await sign_in(tab, site.admin)
    await page.click("#nav-admin")
    await expect(page.locator("#stat-running")).to_be_visible()
    users = page.locator("#users-table")
    await expect(users.locator("tr", has_text=site.user)).to_contain_text("user")
    await expect(users.locator("tr", has_text=site.admin)).to_contain_text("admin")
    await expect(page.locator("#admin-usage svg.chart")).to_have_count(2)  # tokens, spend
    # Teams, with their members and keys.
    await expect(page.locator("#admin-teams .team", has_text=team_name)).to_contain_text(site.admin)
    await expect(page.locator("#admin-usage-table tr", has_text=site.user)).to_have_count(1)
    # Polled: the "Updated" line changes within a few seconds.
    updated = await page.locator("#summary .muted").text_content()
    await expect(page.locator("#summary .muted")).not_to_have_text(updated or "", timeout=8000)
    # The audit log: this sign-in is there, filters narrow it, and the CSV downloads.
    audit = page.locator("#audit-table")
    await expect(audit.locator("tr", has_text="auth.login").first).to_contain_text(site.admin)
    await page.fill("#audit-filters input[name=action]", "user.created")
    await page.click("#audit-filter")
    await expect(audit.locator(".audit-action").first).to_have_text("user.created")
    assert set(await audit.locator(".audit-action").all_text_contents()) == {"user.created"}
    async with page.expect_download() as download_info:
        await page.click("#audit-csv")
    download = await download_info.value
    exported = Path(await download.path()).read_text()
    assert exported.startswith("seq,object,created_at,action,") and "user.created" in exported
    await tab.shot("admin")
    # The account page shows one's teams, each with its role, members and usage.
    await page.click("#nav-account")
    team = page.locator("#teams .team", has_text=team_name)
    await expect(team.locator("h3")).to_contain_text("owner")
    await expect(team.locator(".team-usage")).to_contain_text("0 requests")
    assert tab.dialogs == [] and tab.errors == []
