"""OpenTelemetry traces, off by default: one trace per request, exported over OTLP/HTTP.

Turned on by the standard OpenTelemetry environment (docs/tracing.md), read once when the app
(or the batch worker) is built:

- `OTEL_TRACES_EXPORTER=otlp` (or `console`, for a look at the spans on stdout), or
- no `OTEL_TRACES_EXPORTER` but `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` or
  `OTEL_EXPORTER_OTLP_ENDPOINT` set;
- never with `OTEL_SDK_DISABLED=true` or `OTEL_TRACES_EXPORTER=none`.

Everything else is the SDK's own reading of the environment: the endpoint, headers, timeout and
compression (`OTEL_EXPORTER_OTLP_*`), the sampler (`OTEL_TRACES_SAMPLER`, `_ARG`), the batch
processor (`OTEL_BSP_*`), the resource (`OTEL_SERVICE_NAME`, default `llm-api`,
`OTEL_RESOURCE_ATTRIBUTES`).

Why a module-level switch: with tracing off there must be no cost on the hot path (instructions
per proxied stream unchanged, bench/RESULTS.md). `TRACER` is None then; the request span's
middleware is not installed, so no request carries a trace context, and every stage checks
`ctx.trace is not None` (one attribute read) before doing anything else. No span objects, no
context propagation, no header parsing.

Parents are passed explicitly (`RequestContext.trace`, `GenerationRequest.trace`), never through
the "current span" context variable: the pipeline's stages are async generators whose frames
are pulled by another task (api/streaming's pump), where attaching and detaching a context
across `yield`s would fail.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from contextlib import AbstractAsyncContextManager
from typing import Any
from urllib.parse import urlsplit

import structlog
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.propagators.textmap import Getter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SimpleSpanProcessor,
    SpanExporter,
)
from opentelemetry.trace import Span, SpanKind, Status, StatusCode, Tracer
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

log = structlog.get_logger(__name__)

__all__ = [
    "SCOPE_KEY",
    "Context",
    "Span",
    "SpanKind",
    "Status",
    "StatusCode",
    "TRACER",
    "configure",
    "enabled_by",
    "shutdown",
]

# scope["state"] key under which the request span's context travels to api/deps.
SCOPE_KEY = "otel_context"
# The one tracer, None while tracing is off (checked once per request, see above).
TRACER: Tracer | None = None
# Whether prompt and completion text may be recorded (LLM_API_TRACING_CAPTURE_CONTENT).
CAPTURE_CONTENT = False
_provider: TracerProvider | None = None
_W3C = TraceContextTextMapPropagator()  # traceparent / tracestate only: no baggage
_SERVICE = "llm-api"


def enabled_by(environ: Mapping[str, str]) -> bool:
    """Whether this environment asks for traces (see the module's docstring)."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    exporters = environ.get("OTEL_TRACES_EXPORTER")
    if exporters is not None and exporters.strip():
        return bool(_exporter_names(exporters))
    return bool(
        environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "").strip()
        or environ.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").strip()
    )


def _exporter_names(value: str) -> list[str]:
    return [n for n in (p.strip().lower() for p in value.split(",")) if n and n != "none"]


def configure(capture_content: bool = False, environ: Mapping[str, str] | None = None) -> bool:
    """Build the tracer provider when the environment asks for traces; True when on. A
    misconfiguration (an exporter or protocol this build does not ship) fails at start."""
    global TRACER, CAPTURE_CONTENT, _provider
    environ = os.environ if environ is None else environ
    shutdown()
    if not enabled_by(environ):
        return False
    exporters: list[SpanExporter] = []
    names = _exporter_names(environ.get("OTEL_TRACES_EXPORTER") or "otlp")
    for name in names:
        if name == "otlp":
            exporters.append(_otlp_exporter(environ))
        elif name == "console":
            exporters.append(ConsoleSpanExporter())
        else:
            raise ValueError(
                f"OTEL_TRACES_EXPORTER: `{name}` is not available (otlp, console or none)."
            )
    attributes: dict[str, Any] = {}
    if not environ.get("OTEL_SERVICE_NAME") and "service.name=" not in environ.get(
        "OTEL_RESOURCE_ATTRIBUTES", ""
    ):
        attributes["service.name"] = _SERVICE
    provider = TracerProvider(resource=Resource.create(attributes))  # sampler from the env
    for exporter in exporters:
        processor = (
            SimpleSpanProcessor(exporter)
            if isinstance(exporter, ConsoleSpanExporter)
            else BatchSpanProcessor(exporter)  # OTEL_BSP_* from the env
        )
        provider.add_span_processor(processor)
    _provider = provider
    TRACER = provider.get_tracer("llm_api")
    # The setting, or the variable OpenTelemetry's own GenAI instrumentations read.
    CAPTURE_CONTENT = capture_content or (
        environ.get("OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT", "").strip().lower()
        == "true"
    )
    log.info("tracing_on", exporters=names, capture_content=CAPTURE_CONTENT)
    return True


def _otlp_exporter(environ: Mapping[str, str]) -> SpanExporter:
    protocol = (
        environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
        or environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
        or "http/protobuf"
    ).strip()
    if protocol != "http/protobuf":
        raise ValueError(
            f"OTEL_EXPORTER_OTLP_PROTOCOL: `{protocol}` is not available; llm-api exports "
            "OTLP over HTTP (http/protobuf). Point it at the collector's HTTP port (4318)."
        )
    # Imported only when traces go out: the exporter pulls in protobuf and requests.
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    return OTLPSpanExporter()  # endpoint, headers, timeout, compression from the env


def provider() -> TracerProvider | None:
    return _provider


def flush(timeout_millis: int = 5000) -> bool:
    """Export what has ended so far (tests, and before a worker exits)."""
    return _provider.force_flush(timeout_millis) if _provider is not None else True


def shutdown() -> None:
    """Flush and stop exporting; tracing is off afterwards."""
    global TRACER, _provider
    provider, _provider, TRACER = _provider, None, None
    if provider is not None:
        provider.shutdown()


# --- spans ------------------------------------------------------------------------------------


def start(
    name: str,
    parent: Context | None,
    kind: SpanKind = SpanKind.INTERNAL,
    attributes: Mapping[str, Any] | None = None,
) -> Span:
    """A span under `parent` (a request's or generation's context). Only called where a parent
    exists, which implies tracing is on; after a shutdown it is a non-recording span."""
    tracer = TRACER
    if tracer is None:
        return trace.INVALID_SPAN
    return tracer.start_span(name, context=parent, kind=kind, attributes=attributes)


def context_of(span: Span, parent: Context | None = None) -> Context:
    return trace.set_span_in_context(span, parent)


def span_of(ctx: Context | None) -> Span:
    return trace.get_current_span(ctx) if ctx is not None else trace.INVALID_SPAN


def fail(span: Span, exc: BaseException) -> None:
    """Mark a span failed by `exc`: its type in `error.type`, the error code and status of an
    API error as attributes; never its message's data beyond the error's own text."""
    code = getattr(exc, "code", None)
    status = getattr(exc, "status_code", None)
    span.set_attribute("error.type", code or type(exc).__qualname__)
    if status is not None:
        span.set_attribute("llm_api.error.status_code", status)
    span.set_status(Status(StatusCode.ERROR, str(code or type(exc).__qualname__)))


def end_cancelled(span: Span, drain_cut: bool) -> None:
    """A request that ended early: the client went away, or the drain cut it at shutdown."""
    if drain_cut:
        span.set_attribute("llm_api.drain_cut", True)
        span.set_attribute("error.type", "drain_cut")
        span.set_status(Status(StatusCode.ERROR, "cut by the server's drain"))
    else:
        span.set_attribute("llm_api.client_cancelled", True)
        span.set_attribute("error.type", "client_cancelled")
        span.set_status(Status(StatusCode.ERROR, "client disconnected"))


# --- W3C trace context ------------------------------------------------------------------------


class _AsgiHeaders(Getter[Iterable[tuple[bytes, bytes]]]):
    """Reads an ASGI scope's raw header list (names are lower-case bytes)."""

    def get(self, carrier: Iterable[tuple[bytes, bytes]], key: str) -> list[str] | None:
        name = key.lower().encode("latin-1")
        values = [v.decode("latin-1") for k, v in carrier if k == name]
        return values or None

    def keys(self, carrier: Iterable[tuple[bytes, bytes]]) -> list[str]:
        return [k.decode("latin-1") for k, _ in carrier]


_ASGI_HEADERS = _AsgiHeaders()


def extract_asgi(headers: Iterable[tuple[bytes, bytes]]) -> Context:
    """The client's `traceparent` (and `tracestate`) as a parent context; a malformed one is
    ignored (a new trace starts), as W3C asks. Without one, whatever is current (FastAPI's own
    HTTP span when LLM_API_OTEL_TELEMETRY is on) is the parent."""
    return _W3C.extract(list(headers), context=otel_context.get_current(), getter=_ASGI_HEADERS)


def extract(traceparent: str | None, tracestate: str | None = None) -> Context | None:
    """A parent context from a stored `traceparent` (batches, Celery task headers)."""
    if not traceparent:
        return None
    carrier = {"traceparent": traceparent}
    if tracestate:
        carrier["tracestate"] = tracestate
    ctx = _W3C.extract(carrier)
    return ctx if trace.get_current_span(ctx).get_span_context().is_valid else None


def traceparent(ctx: Context | None) -> dict[str, str]:
    """The W3C headers that continue `ctx`'s trace (empty when there is none)."""
    carrier: dict[str, str] = {}
    if ctx is not None:
        _W3C.inject(carrier, context=ctx)
    return carrier


# --- the pipeline's spans -----------------------------------------------------------------------

# The GenAI conventions' operation for each endpoint family (responses and messages are chat).
OPERATIONS = {"completions": "text_completion", "embeddings": "embeddings"}
# gen_ai.provider.name by registry backend: what the model is reached with.
PROVIDERS = {"llama_cpp": "llama.cpp", "openai": "openai", "router": "openai"}


def server_attributes(base_url: str | None) -> dict[str, Any]:
    """`server.address` / `server.port` of an upstream (never its path, query or credentials)."""
    if not base_url:
        return {}
    url = urlsplit(base_url)
    if url.hostname is None:
        return {}
    port = url.port or (443 if url.scheme == "https" else 80)
    return {"server.address": url.hostname, "server.port": port}


def generation_attributes(
    endpoint: str,
    model: str,
    backend: str,
    base_url: str | None,
    max_tokens: int,
    temperature: float,
    top_p: float,
    seed: int | None,
    n: int,
) -> dict[str, Any]:
    """The GenAI request attributes of one model's generation (the request as the model gets
    it, after defaults and fallbacks)."""
    provider = PROVIDERS.get(backend, backend)
    attributes: dict[str, Any] = {
        "gen_ai.operation.name": OPERATIONS.get(endpoint, "chat"),
        "gen_ai.request.model": model,
        "gen_ai.provider.name": provider,
        "gen_ai.system": provider,  # the name before semantic conventions 1.37
        "gen_ai.request.max_tokens": max_tokens,
        "gen_ai.request.temperature": temperature,
        "gen_ai.request.top_p": top_p,
        "llm_api.endpoint": endpoint,
    }
    if seed is not None:
        attributes["gen_ai.request.seed"] = seed
    if n != 1:
        attributes["gen_ai.request.choice.count"] = n
    if backend == "openai":
        attributes.update(server_attributes(base_url))
    return attributes


class TracedWait(AbstractAsyncContextManager[None]):
    """An admission gate's slot whose wait is a span of its own (the time spent queued for the
    model, with the queue as it was on arrival); the slot itself is unchanged."""

    __slots__ = ("slot", "parent", "attributes")

    def __init__(self, slot: Any, parent: Context | None, attributes: dict[str, Any]) -> None:
        self.slot = slot
        self.parent = parent
        self.attributes = attributes

    async def __aenter__(self) -> None:
        span = start("admission wait", self.parent, attributes=self.attributes)
        try:
            await self.slot.__aenter__()
        except BaseException as exc:
            fail(span, exc)
            raise
        finally:
            span.end()

    async def __aexit__(self, *exc_info: Any) -> Any:
        return await self.slot.__aexit__(*exc_info)


def messages_json(messages: Any, prompt: str | None) -> str:
    """The prompt as `gen_ai.input.messages` (only with LLM_API_TRACING_CAPTURE_CONTENT)."""
    import orjson

    if messages is None:
        items = [{"role": "user", "parts": [{"type": "text", "content": prompt or ""}]}]
    else:
        items = [
            {"role": m.role, "parts": [{"type": "text", "content": m.content}]} for m in messages
        ]
    return orjson.dumps(items).decode()


def output_json(texts: list[str], finishes: list[str | None]) -> str:
    """The answer as `gen_ai.output.messages` (only with LLM_API_TRACING_CAPTURE_CONTENT)."""
    import orjson

    return orjson.dumps(
        [
            {
                "role": "assistant",
                "parts": [{"type": "text", "content": text}],
                "finish_reason": finish or "",
            }
            for text, finish in zip(texts, finishes, strict=True)
        ]
    ).decode()
