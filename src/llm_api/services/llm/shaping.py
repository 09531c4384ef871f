"""OpenAI response shapes from engine output: `(choice index, GenerationChunk)` pairs in,
chat/completion chunks (streaming) or whole responses out, with usage summed over choices.

Kept apart from service.py, which decides *what runs* (validation, admission, routing, retries);
this module only decides *what the client sees*.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterable
from contextlib import aclosing

import orjson
from pydantic import BaseModel

from llm_api.schemas.chat import (
    AssistantMessage,
    ChatChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChoiceDelta,
    ChunkChoice,
)
from llm_api.schemas.common import Usage
from llm_api.schemas.completions import Completion, CompletionChoice, CompletionRequest
from llm_api.services.llm.types import GenerationChunk, RequestContext

Chunks = AsyncGenerator[tuple[int, GenerationChunk], None]


class TextFrame:
    """A streamed chunk that only adds text to one choice, already serialised as JSON.

    The hot path of every stream (one per token from a local model): building the pydantic
    chunk and dumping it cost more of the event loop than anything else per token, while only
    the text differs from one such chunk to the next. `TextFrames` splices the text into the
    JSON of a chunk the model itself serialised, so the wire shape stays the model's."""

    __slots__ = ("index", "json", "text")

    def __init__(self, index: int, text: str, json: bytes) -> None:
        self.index = index
        self.text = text
        self.json = json


# Stands for the text while a template is made; per process, so no id or model name holds it.
_MARK = f"text-{uuid.uuid4().hex}"
_MARK_JSON = orjson.dumps(_MARK)


class TextFrames:
    """Makes one stream's `TextFrame`s: `build(index, text)` gives the full chunk model, which
    is serialised once per choice with a marker for the text and split around it."""

    def __init__(self, build: Callable[[int, str], BaseModel]) -> None:
        self._build = build
        self._parts: dict[int, tuple[bytes, bytes]] = {}

    def __call__(self, index: int, text: str) -> TextFrame:
        parts = self._parts.get(index)
        if parts is None:
            raw = self._build(index, _MARK).model_dump_json().encode()
            head, found, tail = raw.rpartition(_MARK_JSON)  # the text is the last string field
            assert found, "the chunk model must serialise its text as a JSON string"
            parts = self._parts[index] = (head, tail)
        return TextFrame(index, text, parts[0] + orjson.dumps(text) + parts[1])


def pieces(
    chunk: ChatCompletionChunk | Completion | TextFrame,
) -> Iterable[tuple[int, str, str | None]]:
    """(choice index, text, finish reason) of each choice a streamed chunk carries, whatever
    its form: for readers of a stream that are not the client (the cache tee, /v1/stream)."""
    if isinstance(chunk, TextFrame):
        return ((chunk.index, chunk.text, None),)
    if isinstance(chunk, ChatCompletionChunk):
        return ((c.index, c.delta.content or "", c.finish_reason) for c in chunk.choices)
    return ((c.index, c.text, c.finish_reason) for c in chunk.choices)


class UsageCounter:
    """Sums token counts over choices. A prompt shared by n choices counts once, as OpenAI
    does: sequences are ordered prompt-major, so only every n-th one adds its prompt."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.prompt = 0
        self.completion = 0

    def add(self, index: int, chunk: GenerationChunk) -> None:
        if index % self.n == 0:
            self.prompt += chunk.prompt_tokens or 0
        self.completion += chunk.completion_tokens or 0

    def usage(self) -> Usage:
        return Usage(
            prompt_tokens=self.prompt,
            completion_tokens=self.completion,
            total_tokens=self.prompt + self.completion,
        )


def wire_finish(reason: str | None) -> str | None:
    # "cancelled"/"error" never reach a client as a finish_reason; such streams end otherwise.
    return reason if reason in (None, "stop", "length") else "stop"


async def chat_chunks(
    req: ChatCompletionRequest, ctx: RequestContext, model_id: str, chunks: Chunks
) -> AsyncIterator[ChatCompletionChunk | TextFrame]:
    cid, created = f"chatcmpl-{ctx.request_id}", int(time.time())
    usage = UsageCounter(req.n)

    def make(index: int, delta: ChoiceDelta, finish: str | None = None) -> ChatCompletionChunk:
        return ChatCompletionChunk(
            id=cid,
            created=created,
            model=model_id,
            choices=[ChunkChoice(index=index, delta=delta, finish_reason=finish)],
        )

    text_frame = TextFrames(lambda index, text: make(index, ChoiceDelta(content=text)))
    started: set[int] = set()
    # aclosing: when the client goes away this generator is closed, and closing must reach
    # the backend now (stop generating, free the model), not whenever the GC gets to it.
    async with aclosing(chunks) as source:
        async for index, chunk in source:
            if index not in started:
                started.add(index)
                yield make(index, ChoiceDelta(role="assistant", content=""))
            if chunk.text:
                yield text_frame(index, chunk.text)
            if chunk.finish_reason is not None:
                usage.add(index, chunk)
                yield make(index, ChoiceDelta(), wire_finish(chunk.finish_reason))
    if req.stream_options is not None and req.stream_options.include_usage:
        yield ChatCompletionChunk(
            id=cid, created=created, model=model_id, choices=[], usage=usage.usage()
        )


async def completion_chunks(
    req: CompletionRequest, ctx: RequestContext, model_id: str, chunks: Chunks
) -> AsyncIterator[Completion | TextFrame]:
    cid, created = f"cmpl-{ctx.request_id}", int(time.time())
    usage = UsageCounter(req.n)
    text_frame = TextFrames(
        lambda index, text: Completion(
            id=cid,
            created=created,
            model=model_id,
            choices=[CompletionChoice(index=index, text=text, finish_reason=None)],
        )
    )
    async with aclosing(chunks) as source:  # see chat_chunks
        async for index, chunk in source:
            if chunk.finish_reason is not None:
                usage.add(index, chunk)
            elif chunk.text:
                yield text_frame(index, chunk.text)
                continue
            if chunk.text or chunk.finish_reason is not None:
                choice = CompletionChoice(
                    index=index,
                    text=chunk.text,
                    finish_reason=wire_finish(chunk.finish_reason),
                )
                yield Completion(id=cid, created=created, model=model_id, choices=[choice])
    if req.stream_options is not None and req.stream_options.include_usage:
        yield Completion(id=cid, created=created, model=model_id, choices=[], usage=usage.usage())


async def collect(chunks: Chunks, n_seqs: int, n: int) -> tuple[list[str], list[str | None], Usage]:
    """A whole response: each choice's text, finish reason, and the summed usage."""
    parts: list[list[str]] = [[] for _ in range(n_seqs)]
    finish: list[str | None] = [None for _ in range(n_seqs)]
    usage = UsageCounter(n)
    async with aclosing(chunks) as source:
        async for index, chunk in source:
            parts[index].append(chunk.text)
            if chunk.finish_reason is not None:
                finish[index] = wire_finish(chunk.finish_reason)
                usage.add(index, chunk)
    return ["".join(p) for p in parts], finish, usage.usage()


def chat_response(
    ctx: RequestContext, model_id: str, texts: list[str], finish: list[str | None], usage: Usage
) -> ChatCompletion:
    return ChatCompletion(
        id=f"chatcmpl-{ctx.request_id}",
        created=int(time.time()),
        model=model_id,
        choices=[
            ChatChoice(index=i, message=AssistantMessage(content=text), finish_reason=finish[i])
            for i, text in enumerate(texts)
        ],
        usage=usage,
    )


def completion_response(
    ctx: RequestContext, model_id: str, texts: list[str], finish: list[str | None], usage: Usage
) -> Completion:
    return Completion(
        id=f"cmpl-{ctx.request_id}",
        created=int(time.time()),
        model=model_id,
        choices=[
            CompletionChoice(index=i, text=text, finish_reason=finish[i])
            for i, text in enumerate(texts)
        ],
        usage=usage,
    )
