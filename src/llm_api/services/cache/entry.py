"""What a cache entry holds, and how a hit becomes frames again.

An entry keeps, per choice, everything the encoders read from a live answer: text, reasoning,
tool calls, upstream extras, logprobs, finish reason, and the finishing frame's token counts and
usage details. A hit replays them as frames through the same encoders (api/v1/*/serving.py) as a
live answer, so the two are equal field for field; ids and timestamps are made fresh on every
hit, so two clients never see the same response id.

`FORMAT` is part of every entry: an entry of another format (an older release's) is a miss.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, Literal

from pydantic import BaseModel

from llm_api.services.llm.shaping import Answer, ChoiceAnswer, UsageCounter
from llm_api.services.llm.types import Frame, TokenLogprob, ToolCallDelta, TopLogprob

FORMAT = 2


class CachedCall(BaseModel):
    index: int
    id: str
    name: str
    arguments: str


class CachedTop(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class CachedLogprob(CachedTop):
    top_logprobs: list[CachedTop]


class CachedChoice(BaseModel):
    text: str
    finish_reason: str
    reasoning: str | None = None
    tool_calls: list[CachedCall] = []
    extra: dict[str, Any] = {}
    logprobs: list[CachedLogprob] | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cached_tokens: int | None = None
    usage_extra: dict[str, Any] | None = None
    stop_sequence: str | None = None

    @classmethod
    def of(cls, choice: ChoiceAnswer) -> CachedChoice:
        logprobs = None
        if choice.logprobs is not None:
            logprobs = [
                CachedLogprob(
                    token=t.token,
                    logprob=t.logprob,
                    bytes=t.bytes,
                    top_logprobs=[
                        CachedTop(token=a.token, logprob=a.logprob, bytes=a.bytes)
                        for a in t.top_logprobs
                    ],
                )
                for t in choice.logprobs
            ]
        return cls(
            text=choice.text,
            finish_reason=choice.finish_reason or "stop",
            reasoning=choice.reasoning,
            tool_calls=[
                CachedCall(index=i, id=c.id, name=c.name, arguments=c.arguments)
                for i, c in zip(sorted(choice.calls), choice.tool_calls, strict=True)
            ],
            extra=choice.extra,
            logprobs=logprobs,
            prompt_tokens=choice.prompt_tokens,
            completion_tokens=choice.completion_tokens,
            cached_tokens=choice.cached_tokens,
            usage_extra=choice.usage_extra,
            stop_sequence=choice.stop_sequence,
        )

    def frames(self, index: int) -> tuple[Frame, Frame]:
        """The choice as a live answer would have streamed it: its content in one frame, then
        the finishing frame with the counts."""
        logprobs = None
        if self.logprobs is not None:
            logprobs = [
                TokenLogprob(
                    t.token,
                    t.logprob,
                    t.bytes,
                    [TopLogprob(a.token, a.logprob, a.bytes) for a in t.top_logprobs],
                )
                for t in self.logprobs
            ]
        calls = [ToolCallDelta(c.index, c.id, c.name, c.arguments) for c in self.tool_calls]
        content = Frame(
            text=self.text,
            index=index,
            tool_calls=calls or None,
            reasoning=self.reasoning,
            logprobs=logprobs,
            extra=dict(self.extra) or None,
        )
        finish = Frame(
            finish_reason=self.finish_reason,  # type: ignore[arg-type]
            prompt_tokens=self.prompt_tokens,
            completion_tokens=self.completion_tokens,
            index=index,
            cached_tokens=self.cached_tokens,
            usage_extra=self.usage_extra,
            stop_sequence=self.stop_sequence,
        )
        return content, finish


class CachedResponse(BaseModel):
    format: Literal[2]  # FORMAT; required, so an older entry (without it) fails to load
    model: str
    choices: list[CachedChoice]
    prompt_tokens: int
    completion_tokens: int

    @classmethod
    def of(cls, answer: Answer, prompt_tokens: int, completion_tokens: int) -> CachedResponse:
        return cls(
            format=FORMAT,
            model=answer.model,
            choices=[CachedChoice.of(c) for c in answer.choices],
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
        )

    def replay(self) -> list[Frame]:
        """Every choice's frames, in choice order."""
        return [f for i, c in enumerate(self.choices) for f in c.frames(i)]

    async def stream(self) -> AsyncIterator[Frame]:
        for frame in self.replay():
            yield frame

    def answer(self, n: int) -> Answer:
        """The whole answer, assembled from the replayed frames as a live one is."""
        answer = Answer([ChoiceAnswer(i) for i in range(len(self.choices))], UsageCounter(n))
        answer.model = self.model
        for frame in self.replay():
            answer.choices[frame.index].add(frame)
            if frame.finish_reason is not None:
                answer.usage.add(frame)
        return answer
