"""POST /v1/responses."""

from __future__ import annotations

import orjson
from fastapi import APIRouter, Request, Response

from llm_api.api.deps import InferenceDep
from llm_api.api.disconnect import cancel_on_disconnect
from llm_api.api.fastpath import LeanRoute
from llm_api.api.outcome import answer_with
from llm_api.api.scopes import requires_scope
from llm_api.api.streaming import sse_response
from llm_api.api.v1.responses import serving as wire
from llm_api.api.v1.responses.protocol import chat_request
from llm_api.schemas.responses import ResponsesRequest

router = APIRouter(tags=["responses"], route_class=LeanRoute)


@router.post("/responses")
@requires_scope("inference")
async def create_response(body: ResponsesRequest, request: Request, call: InferenceDep) -> Response:
    serving, ctx, policy = call.responses, call.ctx, call.cache_policy
    chat = chat_request(body)
    if body.stream:
        frames, out = await serving.responses_stream(chat, ctx, policy)
        events = wire.response_events(body, ctx.request_id, out.model, frames, out)
        stream = sse_response(events, call.keepalive, named=True)
        answer_with(request, stream.headers, out)
        return stream
    answer, out = await cancel_on_disconnect(request, serving.responses(chat, ctx, policy))
    content = orjson.dumps(wire.response_object(body, ctx.request_id, answer))
    whole = Response(content, media_type="application/json")
    answer_with(request, whole.headers, out)
    return whole
