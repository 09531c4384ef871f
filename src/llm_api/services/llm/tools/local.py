"""Tool calls for the in-process backends: what `prepare` settles once per request, and the
stream wrapper that turns the model's text into tool-call deltas.

Both local backends use it the same way:
- `render_prompt(template, request)` instead of `template.render_pieces(messages)`;
- `plan_tools(request)` in `prepare` (400s for bad tool requests happen there) → a `ToolPlan`
  kept in `engine_state["tools"]`: the grammar to constrain from the first token (`required`,
  a named function), or the rules for a `CallTrigger` (`auto`);
- `tool_frames(frames, plan, ...)` around the backend's own frames.
"""

from __future__ import annotations

import ctypes
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from dataclasses import dataclass
from functools import cache
from typing import Any

import llama_cpp

from llm_api.core.exceptions import InvalidRequestError
from llm_api.services.llm.chat_template import ChatTemplate, PromptPiece
from llm_api.services.llm.tools.grammar import call_grammar, call_rules
from llm_api.services.llm.tools.parser import ToolCallParser
from llm_api.services.llm.tools.prompt import (
    fallback_messages,
    native_tools,
    template_supports_tools,
)
from llm_api.services.llm.types import Frame, GenerationRequest, TokenLogprob, ToolSpec


@dataclass(frozen=True, slots=True)
class ToolPlan:
    tools: list[ToolSpec]  # the functions the model may call (one, for a named choice)
    parallel: bool
    # `required` / named: the grammar from the first token. `auto`: None, and `rules` feed a
    # CallTrigger that engages the grammar once the model opens a call.
    gbnf: str | None
    rules: str
    stop_after_calls: bool  # required / named: nothing but the call(s) is wanted


def uses_tools(request: GenerationRequest) -> bool:
    """Tools, tool calls or tool results anywhere in the request: render with render_prompt."""
    return bool(request.tools) or any(
        m.tool_calls or m.role == "tool" for m in request.messages or ()
    )


def grammar_piece(vocab: Any) -> Callable[[int], bytes]:
    """token → the bytes llama.cpp's grammar matches for it (special tokens as their text)."""

    @cache  # the vocabulary is finite and fixed
    def piece(token: int) -> bytes:
        size = 64
        while True:
            buf = ctypes.create_string_buffer(size)
            n = llama_cpp.llama_token_to_piece(vocab, token, buf, size, 0, True)
            if n >= 0:
                return buf.raw[:n]
            size = -n

    return piece


def offered_tools(request: GenerationRequest) -> list[ToolSpec] | None:
    """The tools the model sees: none for tool_choice none; only the named one when named."""
    if not request.tools or request.tool_choice == "none":
        return None
    if request.tool_choice == "function":
        named = [t for t in request.tools if t.name == request.tool_name]
        if not named:
            raise InvalidRequestError(
                f"tool_choice names the function `{request.tool_name}`, which is not in tools.",
                param="tool_choice",
            )
        return named
    return list(request.tools)


def render_prompt(template: ChatTemplate, request: GenerationRequest) -> list[PromptPiece]:
    assert request.messages is not None
    tools = offered_tools(request)
    if template_supports_tools(template.source):
        return template.render_pieces(
            request.messages, tools=native_tools(tools) if tools else None
        )
    required = request.tool_choice in ("required", "function")
    return template.render_pieces(fallback_messages(request.messages, tools, required=required))


def plan_tools(request: GenerationRequest) -> ToolPlan | None:
    """Compile the call grammar (run it in a worker thread: conversion can take ~0.1 s)."""
    if request.tool_choice in ("required", "function") and not request.tools:
        raise InvalidRequestError(
            f"tool_choice `{request.tool_choice}` needs at least one tool.", param="tool_choice"
        )
    tools = offered_tools(request)
    if tools is None or request.messages is None:
        return None
    if request.params.json_schema is not None:
        raise InvalidRequestError(
            "response_format json_schema/json_object cannot be combined with tools on local "
            "models; pass tool_choice none or drop response_format.",
            param="response_format",
        )
    # A named function is one call, whatever parallel_tool_calls says (OpenAI does the same).
    parallel = request.parallel_tool_calls and request.tool_choice != "function"
    rules = call_rules(tools, parallel=parallel)
    forced = request.tool_choice in ("required", "function")
    return ToolPlan(
        tools=tools,
        parallel=parallel,
        gbnf=call_grammar(rules) if forced else None,
        rules=rules,
        stop_after_calls=forced,
    )


def with_tools(
    request: GenerationRequest,
    generate: Callable[[GenerationRequest], AsyncGenerator[Frame, None]],
    prepare: Callable[[GenerationRequest], Awaitable[None]],
) -> AsyncGenerator[Frame, None]:
    """A local backend's `generate`, with tool calls parsed out of its frames when the request
    offers tools (both local backends dispatch through here)."""
    if request.tools and request.tool_choice != "none":
        return _with_tools(request, generate, prepare)
    return generate(request)


async def _with_tools(
    request: GenerationRequest,
    generate: Callable[[GenerationRequest], AsyncGenerator[Frame, None]],
    prepare: Callable[[GenerationRequest], Awaitable[None]],
) -> AsyncGenerator[Frame, None]:
    if "tokens" not in request.engine_state:
        await prepare(request)
    plan: ToolPlan = request.engine_state["tools"]
    frames = tool_frames(generate(request), plan, prompt_tokens=request.prompt_tokens or 0)
    async with aclosing(frames):
        async for frame in frames:
            yield frame


async def tool_frames(
    frames: AsyncIterator[Frame], plan: ToolPlan, *, prompt_tokens: int
) -> AsyncGenerator[Frame, None]:
    """The backend's frames with tool calls parsed out. Token counts (and logprobs) of text
    that became call deltas or markup ride on the next frame that goes out. The last frame's
    finish_reason is `tool_calls` when a call was made and the model stopped (not cut by
    max_tokens: a call cut short is an error). With parallel calls off, generation stops
    after the first call."""
    parser = ToolCallParser(plan.tools, parallel=plan.parallel)
    tokens = 0  # not yet reported
    produced = 0
    logprobs: list[TokenLogprob] = []
    cached: int | None = None  # the backend's count of reused prompt tokens (first frame)
    try:
        async for frame in frames:
            produced += frame.tokens
            if frame.cached_tokens is not None:
                cached = frame.cached_tokens
            tokens += frame.tokens
            if frame.logprobs:
                logprobs += frame.logprobs
            if frame.finish_reason is None:
                text, deltas = parser.feed(frame.text)
                if text or deltas:
                    yield Frame(
                        text=text,
                        tokens=tokens,
                        tool_calls=deltas or None,
                        logprobs=logprobs or None,
                        index=frame.index,
                    )
                    tokens, logprobs = 0, []
                if parser.done:  # one call made, parallel calls off: stop generating
                    yield Frame(
                        tokens=tokens,
                        logprobs=logprobs or None,
                        finish_reason="tool_calls",
                        prompt_tokens=prompt_tokens,
                        completion_tokens=produced,
                        cached_tokens=cached,
                        index=frame.index,
                    )
                    return
                continue
            if frame.finish_reason in ("cancelled", "error"):
                yield frame
                return
            text, deltas = parser.feed(frame.text)
            tail, more = parser.finish()
            reason = frame.finish_reason
            if parser.calls and reason == "stop":
                reason = "tool_calls"
            yield Frame(
                text=text + tail,
                tokens=tokens,
                tool_calls=(deltas + more) or None,
                logprobs=logprobs or None,
                finish_reason=reason,
                prompt_tokens=frame.prompt_tokens,
                completion_tokens=frame.completion_tokens,
                cached_tokens=frame.cached_tokens,
                index=frame.index,
                stop_sequence=frame.stop_sequence if reason == "stop" else None,
            )
            return
    finally:
        aclose = getattr(frames, "aclose", None)
        if aclose is not None:
            await aclose()  # closing the backend's iterator cancels its sequence
