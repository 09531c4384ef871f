"""GET /metrics: Prometheus exposition of every worker's metrics.

Open only when `LLM_API_METRICS_PUBLIC` is true. Otherwise the caller needs the bearer token
`LLM_API_METRICS_TOKEN` (what a Prometheus scrape job sends) or an admin's credentials.
Under gunicorn (PROMETHEUS_MULTIPROC_DIR set) the values of all workers are merged.
"""

from __future__ import annotations

import functools
import os
import secrets
from collections.abc import Callable
from typing import Any

from cachetools import LRUCache
from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_fastapi_instrumentator import Instrumentator
from prometheus_fastapi_instrumentator import metrics as http_metrics
from prometheus_fastapi_instrumentator.middleware import PrometheusInstrumentatorMiddleware
from starlette.types import ASGIApp

from llm_api.api.deps import StateDep
from llm_api.api.security import authenticate, bearer_credential
from llm_api.core.exceptions import PermissionDeniedError
from llm_api.services.observability import sample

router = APIRouter(tags=["metrics"])


def _registry() -> CollectorRegistry:
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return registry
    return REGISTRY


async def _authorize(request: Request, state: StateDep) -> None:
    settings = state.settings
    if settings.metrics_public:
        return
    credential = bearer_credential(request)
    token = settings.metrics_token.get_secret_value() if settings.metrics_token else None
    if credential and token and secrets.compare_digest(credential.encode(), token.encode()):
        return
    principal = await authenticate(request)  # 401/503 without usable credentials
    if principal is None or not principal.is_admin:
        raise PermissionDeniedError("Metrics are for administrators.")


@router.get("/metrics", include_in_schema=False)
async def metrics(request: Request, state: StateDep) -> Response:
    await _authorize(request, state)
    sample(state.llm)  # this worker's gauges as of now; others sample every second
    return Response(generate_latest(_registry()), media_type=CONTENT_TYPE_LATEST)


@functools.cache
def _http_instrumentation() -> Callable[[http_metrics.Info], None]:
    """The instrumentator's default metrics, created once per process: Prometheus collectors are
    process-global, and a second create_app() (tests) would otherwise get none at all."""
    # llm_api_http_requests_total, llm_api_http_request_duration_seconds, ...
    instrumentation = http_metrics.default(metric_namespace="llm_api")
    assert instrumentation is not None
    return instrumentation


class _RouteCachingMiddleware(PrometheusInstrumentatorMiddleware):
    """The instrumentator's middleware, remembering each request's route template: finding it
    matches the path against every route's regex (~2% of a proxied stream's CPU), and the
    answer depends only on the root path, method and path. LRU-bounded, so random URLs cannot
    grow it."""

    def __init__(self, app: ASGIApp, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self._handlers: LRUCache[tuple[str, str, str], tuple[str, bool]] = LRUCache(4096)

    def _get_handler(self, request: Request) -> tuple[str, bool]:
        scope = request.scope
        key = (scope.get("root_path", ""), scope["method"], scope["path"])
        found = self._handlers.get(key)
        if found is None:
            found = self._handlers[key] = super()._get_handler(request)
        return found


def install_http_metrics(app: FastAPI) -> None:
    """The guide's prometheus-fastapi-instrumentator (pure ASGI middleware): request counts,
    sizes and latency by route template. Unmatched paths are not recorded at all, so random
    URLs cannot create series; status codes are grouped (2xx, 4xx, ...)."""
    Instrumentator(
        should_group_status_codes=True,
        should_ignore_untemplated=True,
        excluded_handlers=["^/metrics$"],
    ).add(_http_instrumentation()).instrument(app)
    for entry in app.user_middleware:  # the same middleware and options, with the cache
        if getattr(entry, "cls", None) is PrometheusInstrumentatorMiddleware:
            entry.cls = _RouteCachingMiddleware  # type: ignore[assignment]
