"""Liveness (/health) and readiness (/ready) probes."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import Response

from llm_api.api.deps import StateDep
from llm_api.api.errors import json_response
from llm_api.core import worker_readiness

router = APIRouter(tags=["health"])


@router.get("/health")
async def health(state: StateDep) -> dict[str, Any]:
    """The process is alive. `llm_service` says whether models are loaded (the guide's shape)."""
    return {"status": "healthy", "llm_service": state.llm.ready}


@router.get("/ready")
async def ready(state: StateDep) -> Response:
    """200 only when every configured model has loaded and answered a warm-up, and the server
    is not draining; load balancers send traffic only then."""
    if state.draining:
        return json_response({"status": "draining"}, 503, {"Retry-After": "5"})
    # Under gunicorn: every worker's models, not just this one's (core/worker_readiness.py).
    if not state.llm.ready or not worker_readiness.all_workers_ready():
        return json_response({"status": "loading"}, 503, {"Retry-After": "5"})
    return json_response({"status": "ready"})
