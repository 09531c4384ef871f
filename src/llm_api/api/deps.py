"""Dependencies, named as types so route signatures read like sentences."""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import Depends, Request

from llm_api.core.config import Settings
from llm_api.core.state import AppState
from llm_api.services.llm.service import LLMService
from llm_api.services.llm.types import RequestContext


def get_state(request: Request) -> AppState:
    state: AppState = request.app.state.llm_api
    return state


def get_settings(state: Annotated[AppState, Depends(get_state)]) -> Settings:
    return state.settings


def get_llm_service(state: Annotated[AppState, Depends(get_state)]) -> LLMService:
    return state.llm


def get_request_context(request: Request) -> RequestContext:
    client = request.client.host if request.client else None
    return RequestContext(request_id=uuid.uuid4().hex, client_ip=client)


StateDep = Annotated[AppState, Depends(get_state)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
LLMServiceDep = Annotated[LLMService, Depends(get_llm_service)]
RequestCtx = Annotated[RequestContext, Depends(get_request_context)]
