"""The web UI's static serving: public page, assets from the package, security headers."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

import httpx
from asgi_lifespan import LifespanManager

from llm_api.api.web import CONTENT_SECURITY_POLICY
from llm_api.main import create_app
from tests.conftest import test_settings as make_settings

ASSETS = [
    "styles.css",
    "js/app.js",
    "js/api.js",
    "js/sse.js",
    "js/playground.js",
    "js/account.js",
    "js/admin.js",
    "js/chart.js",
    "js/dom.js",
]


def _assert_hardened(response: httpx.Response) -> None:
    assert response.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
    assert "script-src 'self';" in CONTENT_SECURITY_POLICY
    assert "unsafe" not in CONTENT_SECURITY_POLICY
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["referrer-policy"] == "no-referrer"
    assert response.headers["x-frame-options"] == "DENY"


async def test_index_is_public_and_hardened(http: httpx.AsyncClient) -> None:
    response = await http.get("/")  # no credentials
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    assert '<script type="module" src="/ui/js/app.js">' in response.text
    _assert_hardened(response)


async def test_assets_are_served_with_types_and_headers(http: httpx.AsyncClient) -> None:
    for asset in ASSETS:
        response = await http.get(f"/ui/{asset}")
        assert response.status_code == 200, asset
        expected = "text/css" if asset.endswith(".css") else "text/javascript"
        assert response.headers["content-type"].startswith(expected), asset
        _assert_hardened(response)


async def test_no_external_origins_or_inline_code() -> None:
    """No CDN, no external fonts, no inline script or style (the CSP would block them)."""
    web = Path(str(files("llm_api").joinpath("web")))
    for path in web.rglob("*"):
        if path.is_file():
            text = path.read_text()
            assert "http://" not in text.replace("http://www.w3.org/2000/svg", ""), path
            assert "https://" not in text, path
            assert "innerHTML" not in text and "insertAdjacentHTML" not in text, path
            assert "eval(" not in text and "new Function" not in text, path
    html = (web / "index.html").read_text()
    assert "<style" not in html and "style=" not in html and "onclick" not in html
    assert html.count("<script") == 1


async def test_missing_asset_and_traversal_are_404(http: httpx.AsyncClient) -> None:
    for path in ["/ui/nope.js", "/ui/../core/config.py", "/ui/%2e%2e/core/config.py"]:
        response = await http.get(path)
        assert response.status_code == 404, path
        assert "error" in response.json()


async def test_web_ui_can_be_turned_off(tmp_path: Path) -> None:
    app = create_app(make_settings(tmp_path, web_ui=False, warmup=False))
    async with LifespanManager(app, startup_timeout=120):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            assert (await client.get("/")).status_code == 404
            assert (await client.get("/ui/js/app.js")).status_code == 404


def test_assets_ship_in_the_wheel(tmp_path: Path) -> None:
    """pyproject's package-data puts web/** in the wheel, so `pip install llm-api` serves the UI.
    Built from a copy, so the build leaves nothing in the working tree."""
    import shutil
    import subprocess
    import sys
    import zipfile

    root = Path(__file__).resolve().parent.parent
    project = tmp_path / "project"
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
    shutil.copytree(root / "src", project / "src", ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(root / name, project / name)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(project), "--no-deps", "--no-build-isolation",
         "-q", "-w", str(tmp_path / "dist")],
        check=True,
        capture_output=True,
        cwd=project,
    )  # fmt: skip
    (wheel,) = (tmp_path / "dist").glob("llm_api-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {"llm_api/web/index.html"} | {f"llm_api/web/{a}" for a in ASSETS}
    assert expected <= names, expected - names
