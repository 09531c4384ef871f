"""What chat and completions share on the way in: sampling parameters and the request's checks,
and one engine sequence per choice."""

from __future__ import annotations

from dataclasses import replace

from llm_api.core.config import Settings
from llm_api.core.exceptions import InvalidRequestError
from llm_api.schemas.common import SamplingFields
from llm_api.services.llm.registry import ModelConfig
from llm_api.services.llm.types import GenerationRequest, SamplingParams


def sampling_params(
    req: SamplingFields, config: ModelConfig, settings: Settings, max_tokens: int | None
) -> SamplingParams:
    stop = req.stop_list()
    if len(stop) > settings.max_stop_sequences:
        raise InvalidRequestError(
            f"At most {settings.max_stop_sequences} stop sequences are allowed.", param="stop"
        )
    if req.n > settings.max_n:
        raise InvalidRequestError(f"`n` must be at most {settings.max_n}.", param="n")
    if req.stream_options is not None and not req.stream:
        raise InvalidRequestError(
            "`stream_options` is only allowed when `stream` is true.", param="stream_options"
        )
    req.reject_unsupported()
    d = config.defaults
    return SamplingParams(
        max_tokens=max_tokens or d.max_tokens,
        temperature=d.temperature if req.temperature is None else req.temperature,
        top_p=d.top_p if req.top_p is None else req.top_p,
        stop=stop,
        seed=req.seed,
        presence_penalty=req.presence_penalty or 0.0,
        frequency_penalty=req.frequency_penalty or 0.0,
    )


def check_lengths(texts: list[str], settings: Settings, param: str) -> None:
    limit = settings.max_message_chars
    for text in texts:
        if len(text) > limit:
            raise InvalidRequestError(f"A message is longer than {limit} characters.", param=param)


def sequence(template: GenerationRequest, index: int) -> GenerationRequest:
    """The engine request of choice `index` (n > 1): its own params (and seed), the rest shared."""
    params = replace(template.params, stop=list(template.params.stop))
    if params.seed is not None and index:
        params.seed += index  # n>1 with a seed: distinct but reproducible choices
    return replace(template, params=params, engine_state={})
