"""POST /v1/chat/completions."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from llm_api.api.deps import LLMServiceDep, RequestCtx, SettingsDep
from llm_api.api.disconnect import cancel_on_disconnect
from llm_api.api.streaming import sse_response
from llm_api.schemas.chat import ChatCompletion, ChatCompletionRequest

router = APIRouter(tags=["chat"])


@router.post("/chat/completions", response_model=ChatCompletion)
async def create_chat_completion(
    body: ChatCompletionRequest,
    request: Request,
    llm: LLMServiceDep,
    ctx: RequestCtx,
    settings: SettingsDep,
) -> ChatCompletion | StreamingResponse:
    if body.stream:
        return sse_response(await llm.chat_stream(body, ctx), settings.sse_keepalive_seconds)
    return await cancel_on_disconnect(request, llm.chat(body, ctx))
