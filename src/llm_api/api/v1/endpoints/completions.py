"""POST /v1/completions (legacy text completion)."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import StreamingResponse

from llm_api.api.deps import InferenceDep
from llm_api.api.disconnect import cancel_on_disconnect
from llm_api.api.fastpath import LeanRoute
from llm_api.api.scopes import requires_scope
from llm_api.api.streaming import sse_response
from llm_api.schemas.completions import Completion, CompletionRequest

# LeanRoute: FastAPI's route with a shorter per-request handler (api/fastpath says why).
router = APIRouter(tags=["completions"], route_class=LeanRoute)


@router.post("/completions", response_model=Completion)
@requires_scope("inference")
async def create_completion(
    body: CompletionRequest,
    request: Request,
    response: Response,
    call: InferenceDep,
) -> Completion | StreamingResponse:
    llm, ctx, policy = call.responses, call.ctx, call.cache_policy
    if body.stream:
        chunks = await llm.completion_stream(body, ctx, policy)
        stream = sse_response(chunks, call.keepalive)
        stream.headers["x-cache"] = ctx.cache or "miss"
        return stream
    result = await cancel_on_disconnect(request, llm.completion(body, ctx, policy))
    response.headers["x-cache"] = ctx.cache or "miss"
    return result
