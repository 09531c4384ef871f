"""A real OpenID Connect provider on loopback for the single sign-on tests: `oidc-provider-mock`
(Authlib's authorization server in Flask) in a thread. Its WSGI app is wrapped to record every
authorization and token request, so a test can check PKCE itself: the mock does not enforce it,
so the recorder compares each token request's `code_verifier` with the S256 `code_challenge`
of the authorization that issued its code."""

from __future__ import annotations

import base64
import hashlib
import io
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs

import httpx
import oidc_provider_mock
import werkzeug.serving


@dataclass
class Recorder:
    challenges: dict[str, str] = field(default_factory=dict)  # state -> code_challenge
    methods: list[str] = field(default_factory=list)
    verifiers: list[str] = field(default_factory=list)
    token_requests: int = 0

    def pkce_ok(self) -> bool:
        """Every token request carried a verifier whose S256 is a challenge we saw."""
        seen = set(self.challenges.values())
        return (
            self.token_requests > 0
            and len(self.verifiers) == self.token_requests
            and set(self.methods) == {"S256"}
            and all(_s256(v) in seen for v in self.verifiers)
        )


def _s256(verifier: str) -> str:
    digest = hashlib.sha256(verifier.encode()).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


class _Recording:
    def __init__(self, app: Any, recorder: Recorder) -> None:
        self.app, self.recorder = app, recorder

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Any:
        path = environ.get("PATH_INFO", "")
        if path == "/oauth2/authorize":
            query = parse_qs(environ.get("QUERY_STRING", ""))
            if "state" in query:
                self.recorder.challenges[query["state"][0]] = query.get("code_challenge", [""])[0]
                self.recorder.methods.append(query.get("code_challenge_method", [""])[0])
        elif path == "/oauth2/token":
            length = int(environ.get("CONTENT_LENGTH") or 0)
            body = environ["wsgi.input"].read(length)
            environ["wsgi.input"] = io.BytesIO(body)
            form = parse_qs(body.decode())
            self.recorder.token_requests += 1
            if "code_verifier" in form:
                self.recorder.verifiers.append(form["code_verifier"][0])
        return self.app(environ, start_response)


@dataclass
class Provider:
    issuer: str  # http://localhost:PORT (the mock names itself after the Host it is asked as)
    recorder: Recorder

    def set_user(self, sub: str, **claims: Any) -> None:
        """The claims the provider will put in `sub`'s ID token."""
        r = httpx.put(f"{self.issuer}/users/{sub}", json=claims, timeout=10)
        r.raise_for_status()


@contextmanager
def oidc_provider() -> Iterator[Provider]:
    recorder = Recorder()
    app = _Recording(oidc_provider_mock.app(require_nonce=True), recorder)
    server = werkzeug.serving.make_server("localhost", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        provider = Provider(f"http://localhost:{server.server_port}", recorder)
        httpx.get(f"{provider.issuer}/.well-known/openid-configuration", timeout=10)
        yield provider
    finally:
        server.shutdown()
        thread.join(5)
        server.server_close()
