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

Chunks = AsyncGenerator[GenerationChunk, None]  # frames, each with its choice `index`


class TextFrame:
    """A streamed chunk for one choice, already serialised as JSON: text, or (chat) the role
    frame that opens a choice or the frame that finishes it.

    The hot path of every stream (one per token from a local model): building the pydantic
    chunk and dumping it cost more of the event loop than anything else per token, while only
    the text differs from one such chunk to the next. `TextFrames` splices the text into the
    JSON of a chunk the model itself serialised, so the wire shape stays the model's;
    `ChatFrames` does the same for a chat choice's first and last frames."""

    __slots__ = ("finish", "index", "json", "text")

    def __init__(self, index: int, text: str, json: bytes, finish: str | None = None) -> None:
        self.index = index
        self.text = text
        self.json = json
        self.finish = finish


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


# A chat choice's delta in its opening frame and in its finishing frame, as the model writes them.
_ROLE_DELTA = ChoiceDelta(role="assistant", content="").model_dump_json().encode()
_NO_DELTA = ChoiceDelta().model_dump_json().encode()
_TEXT_DELTA = b'{"content":' + _MARK_JSON + b"}"
_UNFINISHED = b',"finish_reason":null'


class ChatFrames:
    """One chat stream's frames for each choice: the role frame that opens it, its text frames
    and the frame that finishes it, spliced from one serialisation of its chunk model (one
    pydantic build and dump per choice instead of three, ~1.5% of a proxied stream).

    `make(index, delta, finish)` builds the chunk model. Should its JSON ever not have the
    expected shape (the delta, then `"finish_reason":null`), the first and last frames are
    built by the model as before."""

    def __init__(self, make: Callable[[int, ChoiceDelta, str | None], BaseModel]) -> None:
        self._make = make
        self._parts: dict[int, tuple[bytes, bytes] | None] = {}

    def _split(self, index: int) -> tuple[bytes, bytes] | None:
        if index in self._parts:
            return self._parts[index]
        raw = self._make(index, ChoiceDelta(content=_MARK), None).model_dump_json().encode()
        head, found, tail = raw.rpartition(_TEXT_DELTA)
        parts = (head, tail) if found and tail.startswith(_UNFINISHED) else None
        self._parts[index] = parts
        return parts

    def _model(
        self, index: int, delta: ChoiceDelta, finish: str | None = None, text: str = ""
    ) -> TextFrame:
        raw = self._make(index, delta, finish).model_dump_json().encode()
        return TextFrame(index, text, raw, finish)

    def role(self, index: int) -> TextFrame:
        parts = self._split(index)
        if parts is None:
            return self._model(index, ChoiceDelta(role="assistant", content=""))
        return TextFrame(index, "", parts[0] + _ROLE_DELTA + parts[1])

    def text(self, index: int, text: str) -> TextFrame:
        parts = self._split(index)
        if parts is None:
            return self._model(index, ChoiceDelta(content=text), text=text)
        delta = b'{"content":' + orjson.dumps(text) + b"}"
        return TextFrame(index, text, parts[0] + delta + parts[1])

    def finish(self, index: int, reason: str) -> TextFrame:
        parts = self._split(index)
        if parts is None:
            return self._model(index, ChoiceDelta(), reason)
        tail = b',"finish_reason":' + orjson.dumps(reason) + parts[1][len(_UNFINISHED) :]
        return TextFrame(index, "", parts[0] + _NO_DELTA + tail, reason)


def pieces(
    chunk: ChatCompletionChunk | Completion | TextFrame,
) -> Iterable[tuple[int, str, str | None]]:
    """(choice index, text, finish reason) of each choice a streamed chunk carries, whatever
    its form: for readers of a stream that are not the client (the cache tee, /v1/stream)."""
    if isinstance(chunk, TextFrame):
        return ((chunk.index, chunk.text, chunk.finish),)
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

    def make(index: int, delta: ChoiceDelta, finish: str | None) -> ChatCompletionChunk:
        return ChatCompletionChunk(
            id=cid,
            created=created,
            model=model_id,
            choices=[ChunkChoice(index=index, delta=delta, finish_reason=finish)],
        )

    frames = ChatFrames(make)
    started: set[int] = set()
    # aclosing: when the client goes away this generator is closed, and closing must reach
    # the backend now (stop generating, free the model), not whenever the GC gets to it.
    async with aclosing(chunks) as source:
        async for chunk in source:
            index = chunk.index
            if index not in started:
                started.add(index)
                yield frames.role(index)
            if chunk.text:
                yield frames.text(index, chunk.text)
            if chunk.finish_reason is not None:
                usage.add(index, chunk)
                yield frames.finish(index, wire_finish(chunk.finish_reason) or "stop")
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
        async for chunk in source:
            index = chunk.index
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
        async for chunk in source:
            index = chunk.index
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
