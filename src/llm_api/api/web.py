"""The web UI: `/` serves the single page and `/ui/*` its assets, straight from the package
(`llm_api/web/`, shipped as package data). No template engine and no build step: the page is
static and talks to the JSON API with `Authorization: Bearer` like any other client.

These routes are public (the page holds no data); every response carries a strict
Content-Security-Policy so that, should any text ever be mistaken for markup, no script, inline
handler, foreign origin or frame could run it.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path
from typing import Any

from fastapi import APIRouter, FastAPI
from fastapi.responses import FileResponse
from starlette.responses import Response
from starlette.staticfiles import StaticFiles

WEB_DIR = Path(str(files("llm_api").joinpath("web")))
ASSET_PREFIX = "/ui"

CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cross-Origin-Opener-Policy": "same-origin",
    # Unversioned file names: revalidate (ETag / Last-Modified) so an upgrade shows at once.
    "Cache-Control": "no-cache",
}


class _SecureStaticFiles(StaticFiles):
    """StaticFiles whose file responses carry the security headers."""

    def file_response(self, *args: Any, **kwargs: Any) -> Response:
        response = super().file_response(*args, **kwargs)
        response.headers.update(SECURITY_HEADERS)
        return response


router = APIRouter(include_in_schema=False)


@router.get("/")
async def index() -> FileResponse:
    return FileResponse(WEB_DIR / "index.html", media_type="text/html", headers=SECURITY_HEADERS)


def install_web_ui(app: FastAPI) -> None:
    app.include_router(router)
    app.mount(ASSET_PREFIX, _SecureStaticFiles(directory=WEB_DIR), name="ui")
