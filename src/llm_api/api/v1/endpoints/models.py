"""GET /v1/models and /v1/models/{id}."""

from __future__ import annotations

from fastapi import APIRouter

from llm_api.api.deps import CurrentPrincipal, LLMServiceDep
from llm_api.api.scopes import requires_scope
from llm_api.schemas.model_list import ModelCard, ModelList
from llm_api.services.llm.registry import ModelConfig

router = APIRouter(tags=["models"])


def _card(config: ModelConfig, created: int) -> ModelCard:
    return ModelCard(
        id=config.id,
        created=created,
        owned_by=config.owned_by,
        context_length=config.context_length,
        tier=config.tier,
        capabilities=sorted(config.capabilities),
    )


@router.get("/models", response_model=ModelList)
@requires_scope("inference")
async def list_models(llm: LLMServiceDep, principal: CurrentPrincipal) -> ModelList:
    """The models the caller's key may use (all of them without an allow-list)."""
    models = llm.visible_models(principal.controls)
    return ModelList(data=[_card(m, llm.started_at) for m in models])


@router.get("/models/{model_id:path}", response_model=ModelCard)
@requires_scope("inference")
async def get_model(model_id: str, llm: LLMServiceDep, principal: CurrentPrincipal) -> ModelCard:
    return _card(llm.visible_model(model_id, principal.controls), llm.started_at)
