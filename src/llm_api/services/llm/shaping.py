"""Whole answers from the pipeline's frames: each choice's text, reasoning, tool calls, logprobs,
upstream extras and finish, and usage summed over choices.

Wire-free: the encoders (api/v1/chat/serving.py, api/v1/completions/serving.py) write OpenAI's
shapes from an `Answer` (whole responses) or from the frames themselves (streams, with the same
`UsageCounter`); the cache stores an `Answer`'s choices and replays them as frames.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any

from llm_api.services.llm.types import Frame, TokenLogprob, ToolCall
from llm_api.services.money.prices import usd

# What may reach a client as a finish_reason: "cancelled" and "error" end a stream otherwise.
_WIRE_FINISHES = frozenset({"stop", "length", "tool_calls", "content_filter"})


def wire_finish(reason: str | None) -> str | None:
    return reason if reason is None or reason in _WIRE_FINISHES else "stop"


def merge_counts(into: dict[str, Any], extra: dict[str, Any]) -> None:
    """Usage details of several choices: numbers add up, nested details merge, the rest is the
    last one's."""
    for key, value in extra.items():
        old = into.get(key)
        if isinstance(value, dict) and isinstance(old, dict):
            merged = dict(old)
            merge_counts(merged, value)
            into[key] = merged
        elif _number(value) and _number(old):
            into[key] = old + value
        else:
            into[key] = value


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


class UsageCounter:
    """Sums token counts over choices, from each choice's finishing frame. A prompt shared by n
    choices counts once, as OpenAI does: sequences are ordered prompt-major, so only every n-th
    one adds its prompt (and its prompt details)."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.cached_tokens: int | None = None
        self.extra: dict[str, Any] = {}

    def add(self, frame: Frame) -> None:
        first = frame.index % self.n == 0
        if first:
            self.prompt_tokens += frame.prompt_tokens or 0
            if frame.cached_tokens is not None:
                self.cached_tokens = (self.cached_tokens or 0) + frame.cached_tokens
        self.completion_tokens += frame.completion_tokens or 0
        if frame.usage_extra:
            extra = frame.usage_extra
            if not first:
                extra = {k: v for k, v in extra.items() if not k.startswith("prompt")}
            merge_counts(self.extra, extra)

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def body(self, cost_nanos: int | None = None) -> dict[str, Any]:
        """OpenAI's `usage` object: the counts, `prompt_tokens_details.cached_tokens` when prefix
        reuse served part of a prompt, the upstream's details verbatim, and `cost` (USD, as
        OpenRouter reports it) when known: the request's `Outcome.cost_nanos`."""
        out: dict[str, Any] = {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.total_tokens,
        }
        out.update(self.extra)
        if cost_nanos is not None:
            out["cost"] = usd(cost_nanos)  # ours, after the upstream's (which may have one)
        if self.cached_tokens is not None:
            details = out.get("prompt_tokens_details")
            details = dict(details) if isinstance(details, dict) else {}
            details["cached_tokens"] = self.cached_tokens
            out["prompt_tokens_details"] = details
        return out


@dataclass(slots=True)
class ChoiceAnswer:
    """One choice, assembled: the same state a stream spreads over its chunks."""

    index: int
    text_parts: list[str] = field(default_factory=list)
    reasoning_parts: list[str] = field(default_factory=list)
    calls: dict[int, list[Any]] = field(default_factory=dict)  # index → [id, name, [arguments]]
    extra: dict[str, Any] = field(default_factory=dict)
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None
    # From the finishing frame, for the cache's replay.
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cached_tokens: int | None = None
    usage_extra: dict[str, Any] | None = None
    stop_sequence: str | None = None  # the stop string that ended it (local engines)

    def add(self, frame: Frame) -> None:
        if frame.text:
            self.text_parts.append(frame.text)
        if frame.reasoning:
            self.reasoning_parts.append(frame.reasoning)
        for delta in frame.tool_calls or ():
            call = self.calls.get(delta.index)
            if call is None:
                call = self.calls[delta.index] = [None, None, []]
            if call[0] is None:
                call[0] = delta.id
            if call[1] is None:
                call[1] = delta.name
            if delta.arguments:
                call[2].append(delta.arguments)
        if frame.extra:
            # Strings arrive in pieces (refusal); anything else is whole, the last one stands.
            for key, value in frame.extra.items():
                old = self.extra.get(key)
                both_text = isinstance(value, str) and isinstance(old, str)
                self.extra[key] = old + value if both_text else value
        if frame.logprobs:  # as the stream: an empty list is no logprobs
            if self.logprobs is None:
                self.logprobs = []
            self.logprobs.extend(frame.logprobs)
        if frame.finish_reason is not None:
            self.finish_reason = frame.finish_reason
            self.prompt_tokens = frame.prompt_tokens
            self.completion_tokens = frame.completion_tokens
            self.cached_tokens = frame.cached_tokens
            self.usage_extra = frame.usage_extra
            self.stop_sequence = frame.stop_sequence

    @property
    def text(self) -> str:
        return "".join(self.text_parts)

    @property
    def reasoning(self) -> str | None:
        return "".join(self.reasoning_parts) if self.reasoning_parts else None

    @property
    def tool_calls(self) -> list[ToolCall]:
        """The calls in index order, arguments joined."""
        return [
            ToolCall(id=c[0] or "", name=c[1] or "", arguments="".join(c[2]))
            for _, c in sorted(self.calls.items())
        ]


@dataclass(slots=True)
class Answer:
    """A whole response: each choice, the summed usage, and the model that gave it."""

    choices: list[ChoiceAnswer]
    usage: UsageCounter
    model: str = ""
    cost_nanos: int | None = None  # the request's cost, set with `model` once it is known


async def collect(frames: AsyncIterator[Frame], n_seqs: int, n: int) -> Answer:
    """Every frame of a response, assembled per choice (`Frame.index`); the caller names the
    model once the frames are in (after any fallback)."""
    answer = Answer([ChoiceAnswer(i) for i in range(n_seqs)], UsageCounter(n))
    # aclosing: a caller that goes away must reach the backend now (stop, free the model).
    async with aclosing(frames) as source:  # type: ignore[type-var]
        async for frame in source:
            answer.choices[frame.index].add(frame)
            if frame.finish_reason is not None:
                answer.usage.add(frame)
    return answer


def collector(n_seqs: int, n: int) -> tuple[list[ChoiceAnswer], UsageCounter]:
    """Fresh per-choice state, for a reader that passes frames on while it assembles them (the
    cache's tee)."""
    return [ChoiceAnswer(i) for i in range(n_seqs)], UsageCounter(n)
