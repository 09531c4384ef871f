"""A scripted OpenAI-compatible upstream that calls tools the way OpenAI's API does, so that
agent loops run through llm-api's gateway deterministically.

A turn that ends with the user (no `tool` result yet) is answered with the script's tool calls
(those whose function the request offers, narrowed by a named `tool_choice` and by
`parallel_tool_calls: false`): streamed as OpenAI streams them — each call's `index`, its `id`,
`type` and name in its first delta with empty arguments, then the arguments in small pieces,
optionally interleaved between parallel calls — and `finish_reason: "tool_calls"`. A turn that
ends with `tool` results is answered with text built from those results and
`finish_reason: "stop"`. Call ids are derived from the conversation, so the same request gets
the same ids streamed or not (the relay must keep them, not mint its own).

It runs its own event loop in a thread, so tests may drive it with sync clients (LangChain's
`invoke`) or async ones, and a separate process (the server, Node) can reach it."""

from __future__ import annotations

import asyncio
import hashlib
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web


@dataclass(frozen=True)
class ScriptedCall:
    name: str
    arguments: str  # JSON text exactly as the upstream sends it


def echo_results(tool_messages: list[dict[str, Any]]) -> str:
    """The default final answer: the tool results, quoted."""
    return "Tool results: " + "; ".join(str(m.get("content")) for m in tool_messages)


@dataclass
class ToolScript:
    calls: list[ScriptedCall]
    answer: Callable[[list[dict[str, Any]]], str] = echo_results
    piece: int = 5  # argument characters per streamed delta
    interleave: bool = False  # parallel calls' argument pieces alternate in the stream


@dataclass
class Recorded:
    bodies: list[dict[str, Any]] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)


class ToolUpstream:
    def __init__(self, script: ToolScript) -> None:
        self.script = script
        self.recorded = Recorded()
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._runner: web.AppRunner | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> ToolUpstream:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(30)
        return self

    def stop(self) -> None:
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(30)
            self._runner = None
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(30)
        self._loop.close()

    async def _start(self) -> None:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._complete)
        app.router.add_get("/v1/models", self._models)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = self._runner.addresses[0][1]

    async def _models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "stub", "object": "model"}]})

    async def _complete(self, request: web.Request) -> web.StreamResponse:
        body = orjson.loads(await request.read())
        self.recorded.bodies.append(body)
        self.recorded.headers.append(dict(request.headers))
        model = str(body.get("model", "stub"))
        results = _trailing_tool_results(body.get("messages") or [])
        calls = [] if results else self._calls_for(body)
        if results:
            text = self.script.answer(results)
        else:
            text = "" if calls else "I have no tool to call."
        ids = [call_id(body, i, c) for i, c in enumerate(calls)]
        if body.get("stream"):
            return await self._stream(request, body, model, calls, ids, text)
        message: dict[str, Any] = {"role": "assistant", "content": text or None, "refusal": None}
        if calls:
            message["tool_calls"] = [
                {
                    "id": call_id,
                    "type": "function",
                    "function": {"name": c.name, "arguments": c.arguments},
                }
                for call_id, c in zip(ids, calls, strict=True)
            ]
        return web.json_response(
            {
                "id": "chatcmpl-stub",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": model,
                "choices": [
                    {
                        "index": 0,
                        "message": message,
                        "logprobs": None,
                        "finish_reason": "tool_calls" if calls else "stop",
                    }
                ],
                "usage": _usage(body, calls, text),
            }
        )

    def _calls_for(self, body: dict[str, Any]) -> list[ScriptedCall]:
        offered = {(t.get("function") or {}).get("name") for t in body.get("tools") or []}
        choice = body.get("tool_choice")
        if choice == "none":
            return []
        if isinstance(choice, dict):
            offered &= {(choice.get("function") or {}).get("name")}
        calls = [c for c in self.script.calls if c.name in offered]
        if body.get("parallel_tool_calls") is False:
            calls = calls[:1]
        return calls

    async def _stream(
        self,
        request: web.Request,
        body: dict[str, Any],
        model: str,
        calls: list[ScriptedCall],
        ids: list[str],
        text: str,
    ) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        created = int(time.time())

        def frame(delta: dict[str, Any], finish: str | None = None) -> bytes:
            chunk = {
                "id": "chatcmpl-stub",
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "choices": [
                    {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
                ],
            }
            return b"data: " + orjson.dumps(chunk) + b"\n\n"

        if calls:
            await resp.write(frame({"role": "assistant", "content": None, "refusal": None}))
            for delta in self._call_deltas(calls, ids):
                await resp.write(frame({"tool_calls": [delta]}))
            await resp.write(frame({}, "tool_calls"))
        else:
            await resp.write(frame({"role": "assistant", "content": "", "refusal": None}))
            for word in _pieces_of_words(text):
                await resp.write(frame({"content": word}))
            await resp.write(frame({}, "stop"))
        if (body.get("stream_options") or {}).get("include_usage"):
            usage = {
                "id": "chatcmpl-stub",
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "choices": [],
                "usage": _usage(body, calls, text),
            }
            await resp.write(b"data: " + orjson.dumps(usage) + b"\n\n")
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    def _call_deltas(self, calls: list[ScriptedCall], ids: list[str]) -> Iterator[dict[str, Any]]:
        """Each call's head (index, id, type, name, empty arguments), then its arguments in
        pieces: call after call, or with the pieces of parallel calls alternating."""
        step = self.script.piece
        pieces = [
            [c.arguments[i : i + step] for i in range(0, len(c.arguments), step)] for c in calls
        ]

        def head(i: int) -> dict[str, Any]:
            fn = {"name": calls[i].name, "arguments": ""}
            return {"index": i, "id": ids[i], "type": "function", "function": fn}

        def part(i: int, piece: str) -> dict[str, Any]:
            return {"index": i, "function": {"arguments": piece}}

        if not self.script.interleave:
            for i in range(len(calls)):
                yield head(i)
                for piece in pieces[i]:
                    yield part(i, piece)
            return
        for i in range(len(calls)):
            yield head(i)
        for j in range(max(len(p) for p in pieces)):
            for i, p in enumerate(pieces):
                if j < len(p):
                    yield part(i, p[j])


def _trailing_tool_results(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The `tool` messages after the last assistant turn (empty when the user spoke last)."""
    results: list[dict[str, Any]] = []
    for m in reversed(messages):
        if m.get("role") != "tool":
            break
        results.insert(0, m)
    return results


def call_id(body: dict[str, Any], index: int, call: ScriptedCall) -> str:
    """Stable for a conversation, so a streamed and a non-streamed request match."""
    seed = orjson.dumps([body.get("messages"), index, call.name])
    return "call_" + hashlib.blake2b(seed, digest_size=8).hexdigest()


def _pieces_of_words(text: str) -> list[str]:
    words = text.split(" ")
    return [w if i == 0 else " " + w for i, w in enumerate(words)]


def _usage(body: dict[str, Any], calls: list[ScriptedCall], text: str) -> dict[str, int]:
    prompt = len(orjson.dumps(body.get("messages"))) // 4
    completion = sum(len(c.arguments) for c in calls) // 4 + len(text.split())
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }
