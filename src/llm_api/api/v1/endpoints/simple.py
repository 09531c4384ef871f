"""The guide's simple API on the same service: POST /v1/generate (JSON) and POST /v1/stream
(NDJSON, one {"token": ...} per line)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from llm_api.api.deps import RequestCtx, ServingDep, SettingsDep
from llm_api.api.disconnect import cancel_on_disconnect
from llm_api.api.scopes import requires_scope
from llm_api.api.streaming import ndjson_response
from llm_api.middleware.access_log import log_outcome
from llm_api.schemas.common import Usage
from llm_api.schemas.completions import CompletionRequest, GenerateRequest, GenerateResponse
from llm_api.services.llm.service import LLMService
from llm_api.services.llm.shaping import wire_finish
from llm_api.services.money.prices import usd

router = APIRouter(tags=["simple"])


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
    answer, out = await cancel_on_disconnect(
        request, serving.completion(_as_completion(body, serving.llm, False), ctx)
    )
    log_outcome(request.scope, out)
    usage = answer.usage
    return GenerateResponse(
        id=f"cmpl-{ctx.request_id}",
        model=answer.model,
        text=answer.choices[0].text,
        finish_reason=wire_finish(answer.choices[0].finish_reason),
        usage=Usage(
            prompt_tokens=usage.prompt_tokens,
            completion_tokens=usage.completion_tokens,
            total_tokens=usage.total_tokens,
            cost=None if answer.cost_nanos is None else usd(answer.cost_nanos),
        ),
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
    frames, out = await serving.completion_stream(_as_completion(body, serving.llm, True), ctx)
    log_outcome(request.scope, out)

    async def tokens() -> AsyncIterator[bytes]:  # one {"token": ...} per frame with text
        try:
            async for frame in frames:
                if frame.text:
                    yield orjson.dumps({"token": frame.text})
        finally:
            await frames.aclose()

    return ndjson_response(tokens(), settings.sse_keepalive_seconds)
