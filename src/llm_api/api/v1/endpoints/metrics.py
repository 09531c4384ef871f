"""GET /metrics: Prometheus exposition of every worker's metrics.

Open only when `LLM_API_METRICS_PUBLIC` is true. Otherwise the caller needs the bearer token
`LLM_API_METRICS_TOKEN` (what a Prometheus scrape job sends) or an admin's credentials (a
password login, or a key with the `admin` scope).
Under gunicorn (PROMETHEUS_MULTIPROC_DIR set) the values of all workers are merged.
"""

from __future__ import annotations

import os
import secrets

from fastapi import APIRouter, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

from llm_api.api.deps import StateDep
from llm_api.api.scopes import requires_scope
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
@requires_scope("admin")  # an admin's key needs the admin scope, as on /v1/admin
async def metrics(request: Request, state: StateDep) -> Response:
    await _authorize(request, state)
    sample(state.llm)  # this worker's gauges as of now; others sample every second
    return Response(generate_latest(_registry()), media_type=CONTENT_TYPE_LATEST)
