"""Refuse what a model cannot do instead of dropping it silently: a request that uses a feature
its model's registry entry does not declare (`ModelConfig.capabilities`) gets a 400 whose
`param` names the field, before anything is queued or sent upstream."""

from __future__ import annotations

from collections.abc import Iterator
from typing import cast

from llm_api.core.exceptions import InvalidRequestError
from llm_api.schemas.chat import PART_CAPABILITY, ChatCompletionRequest
from llm_api.schemas.completions import CompletionRequest
from llm_api.services.llm.registry import Capability, ModelConfig

_WHAT: dict[Capability, str] = {
    "tools": "tools (function calling)",
    "images": "image inputs",
    "audio": "audio",
    "files": "file inputs",
    "json_schema": "structured output (`response_format`)",
    "logprobs": "logprobs",
    "reasoning": "reasoning",
}


def check_capabilities(req: ChatCompletionRequest | CompletionRequest, config: ModelConfig) -> None:
    """Raise InvalidRequestError for the first field `req` uses that `config` does not support."""
    for need, param in _needs(req):
        if need not in config.capabilities:
            raise InvalidRequestError(
                f"The model `{config.id}` does not support {_WHAT[need]}: remove `{param}` "
                "or use a model that does.",
                param=param,
                code="unsupported_parameter",
            )


def _needs(req: ChatCompletionRequest | CompletionRequest) -> Iterator[tuple[Capability, str]]:
    """(capability, the field that needs it) for each feature the request uses."""
    extra = req.model_extra or {}
    if isinstance(req, CompletionRequest):
        # Legacy completions: `logprobs` is an integer (how many alternatives), 0 included.
        if req.logprobs is not None:
            yield "logprobs", "logprobs"
        return
    if req.tools:
        yield "tools", "tools"
    if req.tool_choice is not None and req.tool_choice != "none":
        yield "tools", "tool_choice"
    for i, message in enumerate(req.messages):
        if isinstance(message.content, list):
            for j, part in enumerate(message.content):
                need = PART_CAPABILITY.get(part.type)
                if need is not None:
                    yield cast(Capability, need), f"messages[{i}].content[{j}]"
    rf = req.response_format
    if rf is not None and rf.type != "text":
        yield "json_schema", "response_format"
    if req.logprobs:
        yield "logprobs", "logprobs"
    if req.top_logprobs is not None:
        yield "logprobs", "top_logprobs"
    if extra.get("reasoning_effort") is not None:
        yield "reasoning", "reasoning_effort"
    # Audio output (`modalities: ["audio"]` with its `audio` settings).
    modalities = extra.get("modalities")
    if isinstance(modalities, list) and "audio" in modalities:
        yield "audio", "modalities"
    if extra.get("audio") is not None:
        yield "audio", "audio"
