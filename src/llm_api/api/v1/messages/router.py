"""POST /v1/messages and /v1/messages/count_tokens (Anthropic's Messages API), served by the
completion pipeline through the chat family: the body is translated once (protocol.py), the
frames encoded in Anthropic's shape (serving.py). Errors under this path take Anthropic's shape
(api/errors.py); `x-api-key` authenticates as `Authorization: Bearer` does (api/security.py);
`anthropic-version` is accepted and not needed."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response

from llm_api.api.deps import InferenceDep
from llm_api.api.disconnect import cancel_on_disconnect
from llm_api.api.errors import json_response
from llm_api.api.outcome import answer_with
from llm_api.api.scopes import requires_scope
from llm_api.api.streaming import named_sse_response
from llm_api.api.v1.messages import serving as wire
from llm_api.api.v1.messages.protocol import to_chat
from llm_api.schemas.messages import CountTokensRequest, MessagesRequest

router = APIRouter(tags=["messages"])

ENDPOINT = "messages"  # the records' endpoint (usage, metrics, access log)


@router.post("/messages", response_model=None)
@requires_scope("inference")
async def create_message(body: MessagesRequest, request: Request, call: InferenceDep) -> Response:
    serving, ctx, policy = call.responses, call.ctx, call.cache_policy
    chat = to_chat(body)
    message_id = f"msg_{ctx.request_id}"
    if body.stream:
        frames, out = await serving.chat_stream(chat, ctx, policy, ENDPOINT)
        # The first frame is in: a local model's prompt is counted (its request's prepare).
        counted = out.seqs[0].prompt_tokens if out.seqs else None
        events = wire.message_events(message_id, out.model, frames, counted, out)
        stream = named_sse_response(events, call.keepalive, wire.PING, wire.error_event)
        answer_with(request, stream.headers, out)
        return stream
    answer, out = await cancel_on_disconnect(request, serving.chat(chat, ctx, policy, ENDPOINT))
    result = json_response(wire.message_body(message_id, answer))
    answer_with(request, result.headers, out)
    return result


@router.post("/messages/count_tokens", response_model=None)
@requires_scope("inference")
async def count_tokens(body: CountTokensRequest, call: InferenceDep) -> dict[str, Any]:
    tokens = await call.responses.prompt_tokens(to_chat(body), call.ctx)
    return {"input_tokens": tokens}
