"""What a cache entry holds, and how a hit becomes a whole response or a replayed stream.

An entry keeps only the generated text, finish reason and token counts of each choice; ids and
timestamps are made fresh on every hit, so two clients never see the same response id.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from pydantic import BaseModel

from llm_api.schemas.chat import (
    AssistantMessage,
    ChatChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChoiceDelta,
    ChunkChoice,
)
from llm_api.schemas.common import Usage
from llm_api.schemas.completions import Completion, CompletionChoice


class CachedChoice(BaseModel):
    text: str
    finish_reason: str


class CachedResponse(BaseModel):
    model: str
    choices: list[CachedChoice]
    prompt_tokens: int
    completion_tokens: int

    @property
    def usage(self) -> Usage:
        return Usage(
            prompt_tokens=self.prompt_tokens,
            completion_tokens=self.completion_tokens,
            total_tokens=self.prompt_tokens + self.completion_tokens,
        )

    # --- whole responses ----------------------------------------------------------------------

    def chat(self, request_id: str) -> ChatCompletion:
        return ChatCompletion(
            id=f"chatcmpl-{request_id}",
            created=int(time.time()),
            model=self.model,
            choices=[
                ChatChoice(
                    index=i, message=AssistantMessage(content=c.text), finish_reason=c.finish_reason
                )
                for i, c in enumerate(self.choices)
            ],
            usage=self.usage,
        )

    def completion(self, request_id: str) -> Completion:
        return Completion(
            id=f"cmpl-{request_id}",
            created=int(time.time()),
            model=self.model,
            choices=[
                CompletionChoice(index=i, text=c.text, finish_reason=c.finish_reason)
                for i, c in enumerate(self.choices)
            ],
            usage=self.usage,
        )

    # --- replayed streams ---------------------------------------------------------------------

    async def chat_chunks(
        self, request_id: str, include_usage: bool
    ) -> AsyncIterator[ChatCompletionChunk]:
        """The same frames a live stream sends: a role chunk, the content, a finish chunk per
        choice, then the usage chunk when asked for."""
        cid, created = f"chatcmpl-{request_id}", int(time.time())

        def make(index: int, delta: ChoiceDelta, finish: str | None = None) -> ChatCompletionChunk:
            choice = ChunkChoice(index=index, delta=delta, finish_reason=finish)
            return ChatCompletionChunk(id=cid, created=created, model=self.model, choices=[choice])

        for i, c in enumerate(self.choices):
            yield make(i, ChoiceDelta(role="assistant", content=""))
            if c.text:
                yield make(i, ChoiceDelta(content=c.text))
            yield make(i, ChoiceDelta(), c.finish_reason)
        if include_usage:
            yield ChatCompletionChunk(
                id=cid, created=created, model=self.model, choices=[], usage=self.usage
            )

    async def completion_chunks(
        self, request_id: str, include_usage: bool
    ) -> AsyncIterator[Completion]:
        cid, created = f"cmpl-{request_id}", int(time.time())
        for i, c in enumerate(self.choices):
            if c.text:
                choice = CompletionChoice(index=i, text=c.text, finish_reason=None)
                yield Completion(id=cid, created=created, model=self.model, choices=[choice])
            choice = CompletionChoice(index=i, text="", finish_reason=c.finish_reason)
            yield Completion(id=cid, created=created, model=self.model, choices=[choice])
        if include_usage:
            yield Completion(
                id=cid, created=created, model=self.model, choices=[], usage=self.usage
            )
