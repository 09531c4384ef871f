"""How a route answers with the pipeline's `Outcome`: its headers (x-cache, x-ratelimit-*) on
the response, and the outcome itself handed to the access log (final by the last byte)."""

from __future__ import annotations

from starlette.datastructures import MutableHeaders
from starlette.requests import Request

from llm_api.middleware.access_log import log_outcome
from llm_api.services.llm.stages import Outcome


def answer_with(request: Request, headers: MutableHeaders, out: Outcome) -> None:
    headers["x-cache"] = out.cache
    for name, value in out.headers.items():
        headers[name] = value
    log_outcome(request.scope, out)
