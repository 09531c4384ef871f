"""POST /v1/chat/completions."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import StreamingResponse

from llm_api.api.deps import InferenceDep
from llm_api.api.disconnect import cancel_on_disconnect
from llm_api.api.fastpath import LeanRoute
from llm_api.api.outcome import answer_with
from llm_api.api.scopes import requires_scope
from llm_api.api.streaming import sse_response
from llm_api.api.v1.chat import serving as wire
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
    serving, ctx, policy = call.responses, call.ctx, call.cache_policy
    if body.stream:
        frames, out = await serving.chat_stream(body, ctx, policy)
        chunks = wire.chat_chunks(
            body, ctx.request_id, out.model, frames, serving.fingerprint(out.model), out
        )
        stream = sse_response(chunks, call.keepalive)
        answer_with(request, stream.headers, out)
        return stream
    answer, out = await cancel_on_disconnect(request, serving.chat(body, ctx, policy))
    answer_with(request, response.headers, out)
    return wire.chat_completion(ctx.request_id, answer, serving.fingerprint(answer.model))
