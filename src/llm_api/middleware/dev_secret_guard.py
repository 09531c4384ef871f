"""Serve only this machine while the JWT secret is the published development default.

`llm-api serve` and gunicorn refuse a public bind with that secret at start (core/config.py
Settings.refuse_public_bind); servers started some other way (`fastapi run`, which binds 0.0.0.0
by default, or `uvicorn llm_api.asgi:app --host ...`) tell the app nothing about their bind, so
this checks each connection instead: the local address it arrived on and its peer must both be
loopback, and it must carry no forwarded-for header (a proxy on this machine relays others).
Anyone else could sign their own tokens with the published secret, so they get 403. Installed
only while the default secret is in use: it costs a production server nothing.
"""

from __future__ import annotations

import orjson
import structlog
from starlette.types import ASGIApp, Receive, Scope, Send

from llm_api.core.config import is_loopback_host

log = structlog.get_logger(__name__)

_FORWARDED = frozenset({b"x-forwarded-for", b"forwarded", b"x-real-ip"})
_BODY = orjson.dumps(
    {
        "error": {
            "message": "This server runs with the development JWT secret and serves only its "
            "own machine. Set LLM_API_JWT_SECRET to a random value to serve others.",
            "type": "invalid_request_error",
            "param": None,
            "code": "development_secret",
        }
    }
)


class DevSecretGuardMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self._warned = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket") or _local(scope):
            await self.app(scope, receive, send)
            return
        if not self._warned:
            self._warned = True
            log.warning("development_secret_refused_remote_client")
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        await send(
            {
                "type": "http.response.start",
                "status": 403,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(_BODY)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": _BODY})


def _local(scope: Scope) -> bool:
    server, client = scope.get("server"), scope.get("client")
    if server is not None and not is_loopback_host(str(server[0])):
        return False
    if client is not None and not is_loopback_host(str(client[0])):
        return False
    return not any(name in _FORWARDED for name, _ in scope["headers"])
