"""POST /v1/completions (legacy text completion)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from llm_api.api.deps import LLMServiceDep, RequestCtx, SettingsDep
from llm_api.api.disconnect import cancel_on_disconnect
from llm_api.api.streaming import sse_response
from llm_api.schemas.completions import Completion, CompletionRequest

router = APIRouter(tags=["completions"])


@router.post("/completions", response_model=Completion)
async def create_completion(
    body: CompletionRequest,
    request: Request,
    llm: LLMServiceDep,
    ctx: RequestCtx,
    settings: SettingsDep,
) -> Completion | StreamingResponse:
    if body.stream:
        return sse_response(await llm.completion_stream(body, ctx), settings.sse_keepalive_seconds)
    return await cancel_on_disconnect(request, llm.completion(body, ctx))
