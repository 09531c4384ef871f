"""POST /v1/embeddings."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from llm_api.api.deps import EmbeddingsDep
from llm_api.api.disconnect import cancel_on_disconnect
from llm_api.api.outcome import answer_with
from llm_api.api.scopes import requires_scope
from llm_api.schemas.embeddings import CreateEmbeddingResponse, EmbeddingRequest

router = APIRouter(tags=["embeddings"])


@router.post("/embeddings", response_model=CreateEmbeddingResponse)
@requires_scope("inference")
async def create_embeddings(
    body: EmbeddingRequest, request: Request, call: EmbeddingsDep
) -> Response:
    result = await cancel_on_disconnect(
        request, call.service.embed(body, call.ctx, call.cache_policy)
    )
    response = Response(result.body(body.encoding_format), media_type="application/json")
    answer_with(request, response.headers, result.outcome)
    return response
