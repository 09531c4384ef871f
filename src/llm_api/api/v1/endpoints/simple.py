"""The guide's simple API on the same service: POST /v1/generate (JSON) and POST /v1/stream
(NDJSON, one {"token": ...} per line)."""

from __future__ import annotations

from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from llm_api.api.deps import RequestCtx, ServingDep, SettingsDep
from llm_api.api.disconnect import cancel_on_disconnect
from llm_api.api.scopes import requires_scope
from llm_api.api.streaming import ndjson_response
from llm_api.middleware.access_log import log_outcome
from llm_api.schemas.completions import CompletionRequest, GenerateRequest, GenerateResponse
from llm_api.services.llm.service import LLMService
from llm_api.services.llm.shaping import pieces

router = APIRouter(tags=["simple"])


class TokenLine(BaseModel):
    token: str


def _as_completion(body: GenerateRequest, llm: LLMService, stream: bool) -> CompletionRequest:
    return CompletionRequest.model_validate(
        {
            "model": body.model or llm.registry.default.id,
            "prompt": body.prompt,
            "max_tokens": body.max_tokens,
            "temperature": body.temperature,
            "stream": stream,
        }
    )


@router.post("/generate", response_model=GenerateResponse)
@requires_scope("inference")
async def generate(
    body: GenerateRequest, request: Request, serving: ServingDep, ctx: RequestCtx
) -> GenerateResponse:
    result, out = await cancel_on_disconnect(
        request, serving.completion(_as_completion(body, serving.llm, False), ctx)
    )
    log_outcome(request.scope, out)
    assert result.usage is not None
    return GenerateResponse(
        id=result.id,
        model=result.model,
        text=result.choices[0].text,
        finish_reason=result.choices[0].finish_reason,
        usage=result.usage,
    )


@router.post("/stream")
@requires_scope("inference")
async def stream(
    body: GenerateRequest,
    request: Request,
    serving: ServingDep,
    ctx: RequestCtx,
    settings: SettingsDep,
) -> StreamingResponse:
    chunks, out = await serving.completion_stream(_as_completion(body, serving.llm, True), ctx)
    log_outcome(request.scope, out)

    async def tokens() -> AsyncIterator[TokenLine]:
        async for chunk in chunks:
            for _, text, _ in pieces(chunk):
                if text:
                    yield TokenLine(token=text)

    return ndjson_response(tokens(), settings.sse_keepalive_seconds)
