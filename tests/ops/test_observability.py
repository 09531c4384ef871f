"""Structured access log, secret redaction and Prometheus metrics, in-process with the real
model (the multi-worker metrics test with gunicorn lives in test_gunicorn.py)."""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass

import httpx
import openai
import pytest
import structlog
from pydantic import BaseModel

from llm_api.services.llm.registry import DEFAULT_MODEL_ID
from tests.conftest import Account
from tests.ops.conftest import METRICS_TOKEN, LogCapture

pytestmark = pytest.mark.model
MODEL = DEFAULT_MODEL_ID
CANARY = "sk-llmapi-CANARY0123456789abcdefCANARY"
AUTH = {"Authorization": f"Bearer {METRICS_TOKEN}"}


def sse_events(body: str) -> list[str]:
    return [line[6:] for line in body.split("\n") if line.startswith("data: ")]


async def test_stream_access_line_has_every_field(
    ops_http: httpx.AsyncClient, logs: LogCapture
) -> None:
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Say hello."}],
        "max_tokens": 12,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    rid = "req-observability-0001"
    resp = await ops_http.post("/v1/chat/completions", json=body, headers={"X-Request-ID": rid})
    assert resp.status_code == 200
    assert resp.headers["x-request-id"] == rid
    events = sse_events(resp.text)
    usage = json.loads(events[-2])["usage"]
    lines = [r for r in logs.access() if r["request_id"] == rid]
    assert len(lines) == 1, logs.text()
    line = lines[0]
    assert line["method"] == "POST"
    assert line["path"] == "/v1/chat/completions"  # the route template
    assert line["status"] == 200
    assert line["duration_ms"] > 0
    assert line["model"] == MODEL
    assert line["prompt_tokens"] == usage["prompt_tokens"] > 0
    assert line["completion_tokens"] == usage["completion_tokens"] > 0  # logged at stream end
    assert 0 < line["ttft_ms"] <= line["duration_ms"]
    assert "cache" in line and "user_id" in line
    assert re.fullmatch(r"[0-9a-f]{32}", line["generation_id"])
    assert line["level"] == "info" and "timestamp" in line


async def test_invalid_request_id_is_replaced(
    ops_http: httpx.AsyncClient, logs: LogCapture
) -> None:
    resp = await ops_http.get("/v1/models", headers={"X-Request-ID": "bad id\x7f"})
    generated = resp.headers["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{32}", generated)
    assert [r["path"] for r in logs.access() if r["request_id"] == generated] == ["/v1/models"]


async def test_unmatched_path_is_not_logged_raw_and_probes_skipped(
    ops_http: httpx.AsyncClient, logs: LogCapture
) -> None:
    """A path no route matched may carry what a client should not have put in a URL: the access
    line names it `<unmatched>`, never the raw path (or its query string)."""
    await ops_http.get("/health")
    await ops_http.get("/ready")
    resp = await ops_http.get("/no/such/route/hunter2-in-a-path?password=hunter2-in-a-query")
    assert resp.status_code == 404
    assert [(r["path"], r["status"]) for r in logs.access()] == [("<unmatched>", 404)]
    assert "hunter2" not in server_lines(logs)
    # A matched route logs its template, not the ids in the path.
    await ops_http.get("/v1/files/file-hunter2-not-there")
    assert logs.access()[-1]["path"] == "/v1/files/{file_id}"
    assert "hunter2" not in server_lines(logs)


def server_lines(logs: LogCapture) -> str:
    """The server's log lines: not the test client's own (httpx logs each URL it requests)."""
    return "\n".join(json.dumps(r) for r in logs.records() if r.get("logger") != "httpx")


def nest(value: object, depth: int) -> object:
    for _ in range(depth):
        value = {"level": value}
    return value


async def test_redactor_masks_passwords_and_refresh_tokens_in_any_structure(
    ops_http: httpx.AsyncClient, ops_user: Account, logs: LogCapture
) -> None:
    """Real credentials from the running app (a password login's refresh and access tokens),
    logged the ways code might by mistake, come out of the configured pipeline masked."""
    login = await ops_http.post(
        "/v1/auth/token", data={"username": ops_user.email, "password": ops_user.password}
    )
    assert login.status_code == 200, login.text
    refresh, access = login.json()["refresh_token"], login.json()["access_token"]
    password = ops_user.password

    class Form(BaseModel):
        username: str
        password: str

    @dataclass
    class Grant:
        refreshToken: str  # noqa: N815 - a camelCase key, as a client library would send
        scope: str

    log = structlog.get_logger("test")
    log.warning(
        "nested",
        body={"user": {"credentials": [{"password": password}], "grant": (refresh,)}},
        form=Form(username=ops_user.email, password=password),
        grant=Grant(refreshToken=refresh, scope="all"),
        tokens={frozenset({refresh})},
        headers=[("X-Api-Key", ops_user.api_key)],
        newPassword=password,
        deep=nest(password, 16),  # deeper than any structure we log: masked, not printed
    )
    log.warning("text", detail=f"login failed: password={password}")
    log.warning("text", detail=f'payload {{"refresh_token": "{refresh}"}} from client')
    log.warning("url", url=f"postgresql+asyncpg://llm_api:{password}@db:5432/llm_api")
    log.warning("query", path=f"/v1/x?api_key={ops_user.api_key}&refresh_token={refresh}")
    logging.getLogger("stdlib").warning("stdlib says password: %s and %s", password, access)
    try:
        raise RuntimeError(f"redis://:{password}@redis:6379/0 refused token {refresh}")
    except RuntimeError:
        log.exception("failed")
    text = server_lines(logs)
    for secret in (password, refresh, refresh[-16:], access.split(".")[1], ops_user.api_key):
        assert secret not in text, secret
    assert text.count("[REDACTED]") >= 14
    assert ops_user.email in text  # not everything is masked: only secrets


async def test_canary_secrets_never_reach_logs(
    ops_http: httpx.AsyncClient, ops_user: Account, logs: LogCapture
) -> None:
    key = ops_user.api_key  # a real, working key is the canary
    # A wrong key in the header, as the request id, in the prompt, in `user`, in the query...
    bad = await ops_http.post(
        "/v1/chat/completions?api_key=" + CANARY,
        headers={"Authorization": f"Bearer {CANARY}", "X-Request-ID": CANARY},
        json={"model": MODEL, "messages": [{"role": "user", "content": CANARY}], "user": CANARY},
    )
    assert bad.status_code == 401
    # ... the real key on a request that succeeds, with the canaries in the body ...
    resp = await ops_http.post(
        "/v1/chat/completions",
        headers={"X-Request-ID": CANARY},
        json={
            "model": MODEL,
            "messages": [{"role": "user", "content": f"Repeat: {CANARY} {key}"}],
            "max_tokens": 4,
            "user": CANARY,
        },
    )
    assert resp.status_code == 200
    # ... and whatever code may log by mistake, exceptions included.
    log = structlog.get_logger("test")
    log.warning("oops", api_key=key, password=CANARY, headers={"authorization": key})
    log.warning("oops2", detail=f"token was {key}", jwt="eyJhbGciOi.eyJzdWIiOi.sig")
    try:
        raise RuntimeError("upstream refused key " + key)
    except RuntimeError:
        log.exception("upstream_failed")
    text = logs.text()
    assert len(logs.access()) == 2
    for secret in (CANARY, key, key[-12:], "0123456789abcdef", "eyJhbGciOi"):
        assert secret not in text, secret
    assert text.count("[REDACTED]") >= 7
    assert "prompt_tokens" in text  # token *counts* are not mistaken for secrets
    assert any(r.get("user_id") == ops_user.user_id for r in logs.access())


async def test_metrics_access_control(ops_http: httpx.AsyncClient, ops_admin: Account) -> None:
    anonymous = await ops_http.get("/metrics", headers={"Authorization": ""})
    assert anonymous.status_code == 401
    assert anonymous.json()["error"]["type"] == "authentication_error"
    wrong = await ops_http.get("/metrics", headers={"Authorization": "Bearer wrong-token"})
    assert wrong.status_code == 401  # neither the metrics token nor a valid credential
    user = await ops_http.get("/metrics")  # a valid key, but not an admin's
    assert user.status_code == 403
    assert user.json()["error"]["type"] == "permission_error"
    for headers in (AUTH, ops_admin.headers):
        ok = await ops_http.get("/metrics", headers=headers)
        assert ok.status_code == 200
        assert ok.headers["content-type"].startswith("text/plain")
        assert "llm_api:generation_tokens" in ok.text


def sample_value(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


async def test_llm_metrics_follow_known_traffic(
    ops_http: httpx.AsyncClient, ops_user: Account
) -> None:
    before = (await ops_http.get("/metrics", headers=AUTH)).text
    client = openai.AsyncOpenAI(
        base_url="http://127.0.0.1/v1",
        api_key=ops_user.api_key,
        http_client=ops_http,
        max_retries=0,
    )
    completion_tokens = prompt_tokens = 0
    for i in range(3):
        r = await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": f"Count to {i + 3}."}], max_tokens=10
        )
        assert r.usage is not None
        completion_tokens += r.usage.completion_tokens
        prompt_tokens += r.usage.prompt_tokens
    stream = await client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Name a colour."}],
        max_tokens=10,
        stream=True,
        stream_options={"include_usage": True},
    )
    async for chunk in stream:
        if chunk.usage is not None:
            completion_tokens += chunk.usage.completion_tokens
            prompt_tokens += chunk.usage.prompt_tokens
    await ops_http.get("/v1/definitely-not-a-route-" + "x" * 20)
    user = {"Authorization": f"Bearer {ops_user.api_key}"}
    for file_id in ("file-a", "file-b", "file-a"):  # one template, however many paths
        assert (await ops_http.get(f"/v1/files/{file_id}", headers=user)).status_code == 404
    after = (await ops_http.get("/metrics", headers=AUTH)).text

    def delta(name: str, **labels: str) -> float:
        return sample_value(after, name, **labels) - sample_value(before, name, **labels)

    m = {"model_name": MODEL}
    assert delta("llm_api:generation_tokens_total", **m) == completion_tokens
    assert delta("llm_api:prompt_tokens_total", **m) == prompt_tokens
    assert delta("llm_api:time_to_first_token_seconds_count", **m) == 4
    assert delta("llm_api:e2e_request_latency_seconds_count", **m) == 4
    assert delta("llm_api:request_queue_time_seconds_count", **m) == 4
    assert delta("llm_api:inter_token_latency_seconds_count", **m) == 4
    assert delta("llm_api:requests_total", **m) == 4
    assert sample_value(after, "llm_api:num_requests_running", **m) == 0
    assert sample_value(after, "llm_api:num_requests_waiting", **m) == 0
    assert sample_value(after, "llm_api:process_resident_memory_bytes") > 50e6
    handler = {"handler": "/v1/chat/completions", "method": "POST", "status": "2xx"}
    assert delta("llm_api_http_requests_total", **handler) == 4
    files = {"handler": "/v1/files/{file_id}", "method": "GET", "status": "4xx"}
    assert delta("llm_api_http_requests_total", **files) == 3
    assert "file-a" not in after
    # Bounded labels: unmatched paths make no series; no ids of any kind.
    assert "definitely-not-a-route" not in after
    # No label carries a user (route templates such as /v1/admin/users/{user_id} are fine).
    assert not re.search(r'[{,](user|user_id|email|key|key_id)="', after)
    for name in (
        "llm_api:cache_hits_total",
        "llm_api:rate_limit_rejections_total",
        "llm_api:upstream_errors_total",
        "llm_api:usage_buffer_backlog",
    ):
        assert f"# TYPE {name.removesuffix('_total')}" in after, name
