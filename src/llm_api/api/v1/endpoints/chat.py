"""POST /v1/chat/completions."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import StreamingResponse

from llm_api.api.deps import InferenceDep
from llm_api.api.disconnect import cancel_on_disconnect
from llm_api.api.fastpath import LeanRoute
from llm_api.api.scopes import requires_scope
from llm_api.api.streaming import sse_response
from llm_api.schemas.chat import ChatCompletion, ChatCompletionRequest

# LeanRoute: FastAPI's route with a shorter per-request handler (api/fastpath says why).
router = APIRouter(tags=["chat"], route_class=LeanRoute)


@router.post("/chat/completions", response_model=ChatCompletion)
@requires_scope("inference")
async def create_chat_completion(
    body: ChatCompletionRequest,
    request: Request,
    response: Response,
    call: InferenceDep,
) -> ChatCompletion | StreamingResponse:
    llm, ctx, policy = call.responses, call.ctx, call.cache_policy
    if body.stream:
        chunks = await llm.chat_stream(body, ctx, policy)
        stream = sse_response(chunks, call.keepalive)
        stream.headers["x-cache"] = ctx.cache or "miss"
        return stream
    result = await cancel_on_disconnect(request, llm.chat(body, ctx, policy))
    response.headers["x-cache"] = ctx.cache or "miss"
    return result
