"""Completions protocol: the wire request (schemas/completions.py) checked against the server's
limits and turned into one engine request per prompt and choice (prompt-major)."""

from __future__ import annotations

from llm_api.api.v1.sampling import check_lengths, sampling_params, sequence
from llm_api.core.config import Settings
from llm_api.core.exceptions import InvalidRequestError
from llm_api.schemas.completions import CompletionRequest
from llm_api.services.llm.registry import ModelConfig
from llm_api.services.llm.types import GenerationRequest


def completion_requests(
    req: CompletionRequest, config: ModelConfig, settings: Settings, request_id: str
) -> list[GenerationRequest]:
    prompts = req.prompts()
    check_lengths(prompts, settings, "prompt")
    params = sampling_params(req, config, settings, req.max_tokens)
    if len(prompts) * req.n > settings.max_n * 4:
        raise InvalidRequestError("Too many prompts times `n`.", param="prompt")
    # Legacy logprobs: an integer, the number of alternatives per token (0..5).
    if req.logprobs is not None:
        params.logprobs, params.top_logprobs = True, req.logprobs
    wire = req.model_dump(mode="json", by_alias=True, exclude_unset=True)
    explicit = req.max_tokens is not None
    return [
        sequence(
            GenerationRequest(
                request_id=request_id,
                model=config.id,
                params=params,
                prompt=p,
                explicit_max_tokens=explicit,
                user=req.user,
                tool_choice="none",
                wire=wire,
            ),
            i,
        )
        for p in prompts
        for i in range(req.n)
    ]
