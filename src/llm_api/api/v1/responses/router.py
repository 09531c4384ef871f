"""POST /v1/responses, and the stored responses: GET and DELETE /v1/responses/{id},
GET /v1/responses/{id}/input_items (services/response_store.py; each scoped to the caller)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

import orjson
from fastapi import APIRouter, Query, Request, Response

from llm_api.api.deps import CurrentPrincipal, DbSession, InferenceDep, StateDep
from llm_api.api.disconnect import cancel_on_disconnect
from llm_api.api.fastpath import LeanRoute
from llm_api.api.outcome import answer_with
from llm_api.api.scopes import requires_scope
from llm_api.api.streaming import named_sse_response
from llm_api.api.v1.responses import serving as wire
from llm_api.api.v1.responses.protocol import chat_request, input_items
from llm_api.core.exceptions import InvalidRequestError
from llm_api.schemas.responses import ResponsesRequest
from llm_api.services import response_store
from llm_api.services.response_store import Owner

router = APIRouter(tags=["responses"], route_class=LeanRoute)


@router.post("/responses")
@requires_scope("inference")
async def create_response(
    body: ResponsesRequest,
    request: Request,
    call: InferenceDep,
    principal: CurrentPrincipal,
    state: StateDep,
) -> Response:
    serving, ctx, policy = call.responses, call.ctx, call.cache_policy
    store, owner = state.stored_responses, Owner.of(principal)
    history: list[dict[str, Any]] = []
    if body.previous_response_id is not None:
        previous = await store.previous(owner, body.previous_response_id)
        history = [*previous.input_items, *previous.response["output"]]
    chat = chat_request(body, history)
    keep = body.store is not False
    items = [*history, *input_items(body, ctx.request_id)] if keep else []

    async def save(response: dict[str, Any]) -> None:
        await store.save(owner, response, items)

    if body.stream:
        frames, out = await serving.responses_stream(chat, ctx, policy)
        events = wire.response_events(
            body, ctx.request_id, out.model, frames, out, save if keep else None
        )
        stream = named_sse_response(events, call.keepalive)
        answer_with(request, stream.headers, out)
        return stream
    answer, out = await cancel_on_disconnect(request, serving.responses(chat, ctx, policy))
    result = wire.response_object(body, ctx.request_id, answer)
    if keep:
        await save(result)
    whole = Response(orjson.dumps(result), media_type="application/json")
    answer_with(request, whole.headers, out)
    return whole


@router.get("/responses/{response_id}")
@requires_scope("inference")
async def get_response(
    response_id: str,
    principal: CurrentPrincipal,
    db: DbSession,
    stream: Annotated[bool, Query()] = False,
) -> dict[str, Any]:
    """The stored `response` (an `include` is ignored). Replaying it as a stream is not
    supported."""
    if stream:
        raise InvalidRequestError(
            "Streaming a stored response is not supported; retrieve it without `stream`.",
            param="stream",
        )
    row = await response_store.get(db, principal.tenant, response_id)
    return row.response


@router.delete("/responses/{response_id}")
@requires_scope("inference")
async def delete_response(
    response_id: str, principal: CurrentPrincipal, db: DbSession
) -> dict[str, Any]:
    await response_store.remove(db, principal.tenant, response_id)
    return {"id": response_id, "object": "response.deleted", "deleted": True}


@router.get("/responses/{response_id}/input_items")
@requires_scope("inference")
async def list_input_items(
    response_id: str,
    principal: CurrentPrincipal,
    db: DbSession,
    after: Annotated[str | None, Query(max_length=256)] = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    order: Annotated[Literal["asc", "desc"], Query()] = "desc",
) -> dict[str, Any]:
    """OpenAI's list of the items the model was sent (an `include` is ignored: these items
    carry nothing more to include)."""
    row = await response_store.get(db, principal.tenant, response_id)
    return response_store.page(row.input_items, after, limit, order)
