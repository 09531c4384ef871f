"""Every Prometheus metric of llm-api, defined in one place.

Names follow vLLM's (`vllm:time_to_first_token_seconds` → `llm_api:time_to_first_token_seconds`),
so existing dashboards port over. Labels are bounded: `model_name` only ever holds a registry id,
`limit`/`kind`/`finished_reason` come from short fixed sets; never a user id, key or raw path.

Multiprocess: under gunicorn, PROMETHEUS_MULTIPROC_DIR is set before this module is imported, so
prometheus_client keeps values in per-process files that /metrics merges (api/.../metrics.py).
Gauges say how they merge across workers (`multiprocess_mode`).

HTTP metrics (requests, sizes, latency by route template) are the five of
prometheus-fastapi-instrumentator's default set, under the `llm_api_http_` prefix, recorded by
middleware/access_log.py (`observe_http`).
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, Summary

MODEL = ("model_name",)

# Same spirit as vLLM's buckets: seconds, wide enough for CPU models and slow upstreams.
_TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 7.5, 10, 20, 40, 80)
_ITL_BUCKETS = (0.002, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.25, 0.5, 1, 2.5)
_E2E_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600)
_QUEUE_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)

# --- per request, updated by services/observability.MetricsObserver (a CompletionRecord each) ---

TIME_TO_FIRST_TOKEN = Histogram(
    "llm_api:time_to_first_token_seconds",
    "Time from request arrival (queueing included) to the first output text.",
    MODEL,
    buckets=_TTFT_BUCKETS,
)
"""Updated by MetricsObserver, once per request that produced text."""

INTER_TOKEN_LATENCY = Histogram(
    "llm_api:inter_token_latency_seconds",
    "Mean gap between output tokens of one request (observed once per request).",
    MODEL,
    buckets=_ITL_BUCKETS,
)
"""Updated by MetricsObserver: (e2e − TTFT) / (completion tokens − 1), once per request with at
least two tokens. Per request rather than per token, so the token loop stays free of metric work."""

E2E_REQUEST_LATENCY = Histogram(
    "llm_api:e2e_request_latency_seconds",
    "Time from request arrival to its last token (or error/cancellation).",
    MODEL,
    buckets=_E2E_BUCKETS,
)
"""Updated by MetricsObserver."""

REQUEST_QUEUE_TIME = Histogram(
    "llm_api:request_queue_time_seconds",
    "Time a request waited in its model's admission queue.",
    MODEL,
    buckets=_QUEUE_BUCKETS,
)
"""Updated by MetricsObserver."""

ADMISSION_WAIT = Histogram(
    "llm_api:admission_wait_seconds",
    "Time a request waited for its model's slot, by priority class and tier (fair queuing).",
    ("model_name", "priority", "tier"),
    buckets=_QUEUE_BUCKETS,
)
"""Observed by the backend stage on admission (services/llm/priority.observe_admission). Labels
are bounded: priority ∈ interactive, low, batch; tier ∈ the configured tiers or "other" (never
a tenant id: the admin summary names tenants)."""

PROMPT_TOKENS = Counter(
    "llm_api:prompt_tokens", "Prompt tokens processed (counted once per request).", MODEL
)
"""Updated by MetricsObserver from CompletionRecord.prompt_tokens (the usage the client saw)."""

GENERATION_TOKENS = Counter(
    "llm_api:generation_tokens", "Completion tokens generated (equals the sum of usage).", MODEL
)
"""Updated by MetricsObserver from CompletionRecord.completion_tokens."""

REQUESTS = Counter(
    "llm_api:requests",
    "Requests that reached a model, by outcome.",
    ("model_name", "finished_reason"),
)
"""Updated by MetricsObserver. finished_reason ∈ stop, length, cancelled, error."""

EMBEDDING_INPUTS = Counter(
    "llm_api:embedding_inputs",
    "Inputs embedded by /v1/embeddings (and batch lines), cached or computed.",
    MODEL,
)
"""Updated by the embeddings service per request (registry ids only: bounded); the per-input
cache's share is `llm_api:cache_hits{cache="embedding"}`."""

PREFIX_CACHE_QUERIES = Counter(
    "llm_api:prefix_cache_queries",
    "Prompt tokens admitted by the batched engine (looked up in its slots' KV caches).",
    MODEL,
)
PREFIX_CACHE_HITS = Counter(
    "llm_api:prefix_cache_hits",
    "Prompt tokens reused from a slot's KV cache instead of evaluated again (0 while the "
    "model's prefix_cache is off).",
    MODEL,
)
"""Incremented by the batched engine at admission; hits ÷ queries is the prefix-cache hit rate
(vLLM's metrics of the same names)."""

ENGINE_CALLS_INTERRUPTED = Counter(
    "llm_api:engine_calls_interrupted",
    "llama_decode calls of the batched engine cut short for a newcomer that outranked them "
    "(a tenant below its share; docs/fair-sharing.md).",
    MODEL,
)
UPSTREAM_ERRORS = Counter(
    "llm_api:upstream_errors",
    "Failures of upstream (OpenAI-compatible) model servers.",
    ("model_name", "kind"),
)
"""Updated by MetricsObserver for records with status 502 (kind="error") or 504
(kind="timeout"); backends may add finer kinds (connect, status_5xx) themselves."""

# --- model load, sampled every second by services/observability.sample_forever ----------------

REQUESTS_RUNNING = Gauge(
    "llm_api:num_requests_running",
    "Requests generating now (LLMService.gates[model].running).",
    MODEL,
    multiprocess_mode="livesum",
)
"""Set by the per-worker sampler; workers' values are summed."""

REQUESTS_WAITING = Gauge(
    "llm_api:num_requests_waiting",
    "Requests waiting for a generation slot (LLMService.gates[model].waiting).",
    MODEL,
    multiprocess_mode="livesum",
)
"""Set by the per-worker sampler; workers' values are summed. The HPA's custom metric."""

ADMISSION_QUEUE_DEPTH = Gauge(
    "llm_api:admission_queue_depth",
    "Requests waiting for a generation slot, by priority class and tier (fair queuing).",
    ("model_name", "priority", "tier"),
    multiprocess_mode="livesum",
)
"""Set by the per-worker sampler from AdmissionGate.depth(); labels as ADMISSION_WAIT's."""

PROCESS_MEMORY = Gauge(
    "llm_api:process_resident_memory_bytes",
    "Resident memory of each API worker process (models included).",
    multiprocess_mode="liveall",
)
"""Set by the per-worker sampler; one series per live worker (pid label in multiprocess mode)."""

# --- updated by other subsystems ----------------------------------------------------------

CACHE_HITS = Counter("llm_api:cache_hits", "Responses served from the response cache.", ("cache",))
"""Incremented by the response cache on a hit: `CACHE_HITS.labels(cache="response").inc()`."""

CACHE_MISSES = Counter("llm_api:cache_misses", "Cache look-ups that found nothing.", ("cache",))
"""Incremented by the response cache on a miss: `CACHE_MISSES.labels(cache="response").inc()`."""

RATE_LIMIT_REJECTIONS = Counter(
    "llm_api:rate_limit_rejections",
    "Requests refused with 429, by the limit that refused them.",
    ("limit",),
)
"""Incremented by the rate limiter; `limit` is the rule name (rpm, tpm, concurrency, ip, ...),
never a user or key id."""

USAGE_BUFFER_BACKLOG = Gauge(
    "llm_api:usage_buffer_backlog",
    "Usage records buffered but not yet written to the database.",
    multiprocess_mode="livesum",
)
"""Set by the usage recorder after each enqueue and flush: `USAGE_BUFFER_BACKLOG.set(n)`."""

DRAINING = Gauge(
    "llm_api:draining",
    "1 while this worker drains after SIGTERM.",
    multiprocess_mode="livemax",
)
"""Set by core/drain.Drainer."""

# --- HTTP, per request: middleware/access_log.py calls observe_http ------------------------------
# The names, labels and buckets of prometheus-fastapi-instrumentator's `metrics.default()`, so
# dashboards written for it (deploy/grafana) keep working. Recorded by our access-log middleware
# instead of the instrumentator's: its per-request Info object, Request, regexes and `.labels()`
# lookups were ~7% of a proxied stream's CPU (bench/RESULTS.md); here a request costs one dict
# lookup and five observations.

HTTP_REQUESTS = Counter(
    "llm_api_http_requests",
    "Total number of requests by method, status and handler.",
    ("method", "status", "handler"),
)
HTTP_REQUEST_SIZE = Summary(
    "llm_api_http_request_size_bytes",
    "Content length of incoming requests by handler. Only value of header is respected. "
    "Otherwise ignored. No percentile calculated. ",
    ("handler",),
)
HTTP_RESPONSE_SIZE = Summary(
    "llm_api_http_response_size_bytes",
    "Content length of outgoing responses by handler. Only value of header is respected. "
    "Otherwise ignored. No percentile calculated. ",
    ("handler",),
)
HTTP_LATENCY_HIGHR = Histogram(
    "llm_api_http_request_duration_highr_seconds",
    "Latency with many buckets but no API specific labels. Made for more accurate percentile "
    "calculations. ",
    buckets=(0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1, 1.5, 2, 2.5, 3, 3.5, 4, 4.5, 5)
    + (7.5, 10, 30, 60),
)
HTTP_LATENCY = Histogram(
    "llm_api_http_request_duration_seconds",
    "Latency with only few buckets by handler. Made to be only used if aggregation by handler "
    "is important. ",
    ("method", "handler"),
    buckets=(0.1, 0.5, 1),
)

_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
# (method, status group, handler) → its metric children. Bounded: handlers are route templates
# (unmatched paths are not recorded), methods a fixed set, status groups 1xx..5xx.
_http_children: dict[tuple[str, int, str], tuple[Counter, Summary, Summary, Histogram]] = {}


def observe_http(
    method: str, handler: str, status: int, seconds: float, request_size: int, response_size: int
) -> None:
    """One finished request on a matched route (`handler` is its template)."""
    method = method if method in _METHODS else "OTHER"
    key = (method, status // 100, handler)
    children = _http_children.get(key)
    if children is None:
        children = _http_children[key] = (
            HTTP_REQUESTS.labels(method, f"{status // 100}xx", handler),
            HTTP_REQUEST_SIZE.labels(handler),
            HTTP_RESPONSE_SIZE.labels(handler),
            HTTP_LATENCY.labels(method, handler),
        )
    requests, request_size_metric, response_size_metric, latency = children
    requests.inc()
    request_size_metric.observe(request_size)
    response_size_metric.observe(response_size)
    latency.observe(seconds)
    HTTP_LATENCY_HIGHR.observe(seconds)
