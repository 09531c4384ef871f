"""GET /v1/models and /v1/models/{id}; DELETE /v1/models/{id} for a fine-tuned model."""

from __future__ import annotations

from fastapi import APIRouter

from llm_api.api.deps import FineTuningDep, LLMServiceDep, RequestCtx, StateDep, UserId
from llm_api.api.scopes import requires_scope
from llm_api.core.exceptions import InvalidRequestError
from llm_api.schemas.fine_tuning import ModelDeleted
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
async def list_models(llm: LLMServiceDep, state: StateDep, ctx: RequestCtx) -> ModelList:
    """The models the caller's key may use (all of them without an allow-list), and the
    caller's own fine-tuned models (and their team's), nobody else's."""
    cards = [_card(m, llm.started_at) for m in llm.visible_models(ctx.controls)]
    for config, created in await state.fine_tuned.cards(ctx):
        if ctx.controls is None or ctx.controls.allows_model([config.id]):
            cards.append(_card(config, created))
    return ModelList(data=cards)


@router.get("/models/{model_id:path}", response_model=ModelCard)
@requires_scope("inference")
async def get_model(
    model_id: str, llm: LLMServiceDep, state: StateDep, ctx: RequestCtx
) -> ModelCard:
    config = llm.check_key_may_use(model_id, ctx.controls)  # 403 outside the key's allow-list
    if config is None:
        seen = await state.fine_tuned.lookup(model_id, ctx)  # 404 unless the caller's
        return _card(seen.config, seen.created)
    return _card(config, llm.started_at)


@router.delete("/models/{model_id:path}", response_model=ModelDeleted)
@requires_scope("inference")
async def delete_model(
    model_id: str, user_id: UserId, llm: LLMServiceDep, state: StateDep, jobs: FineTuningDep
) -> ModelDeleted:
    """Only fine-tuned models can be deleted, by the user who trained them."""
    if llm.registry.get(model_id) is not None:
        raise InvalidRequestError(
            f"The model `{model_id}` is not a fine-tuned model; only those can be deleted.",
            param="model",
            code="model_not_deletable",
        )
    await jobs.delete_model(user_id, model_id)
    await state.fine_tuned.unload(model_id)
    return ModelDeleted(id=model_id)
