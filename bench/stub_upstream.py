"""A fast OpenAI-compatible stub upstream for routing tests and the gateway benchmark.

It streams `tokens` chunks `interval` seconds apart (0: all at once) and can be told to misbehave:
answer with an error status (optionally with Retry-After, optionally only for the first K
requests, optionally with an error body that never ends), redirect, hang before the headers,
pause between its opening chunk and the first token, ignore `stream`, stall or die after K
tokens, or refuse prompts longer than a limit with `context_length_exceeded`. Tests change
`StubUpstream.config` between requests; the benchmark runs it as a process:

    python -m bench.stub_upstream --port 9100 --tokens 32 --interval 0

It counts requests, and handler cancellations (the client went away), so tests can prove that a
timed-out request was really cancelled upstream.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hashlib
import itertools
import math
import time
from array import array
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web


@dataclass
class StubConfig:
    tokens: int = 32
    interval: float = 0.0  # seconds between tokens
    token: str = "tok "
    fail_status: int | None = None  # answer with this status...
    fail_times: int | None = None  # ...for the first K requests only (None: always)
    retry_after: str | None = None  # Retry-After header on failures
    hang: bool = False  # accept the request, never send headers
    delay: float = 0.0  # seconds before the headers (a slow time to first token)
    stall_after: int | None = None  # stop sending (but keep the connection) after K tokens
    die_after: int | None = None  # drop the connection after K tokens
    context_limit: int | None = None  # 400 context_length_exceeded above this many prompt chars
    usage: bool = True  # send the usage chunk when asked to
    first_token_delay: float = 0.0  # seconds between the opening (role-only) chunk and a token
    redirect_to: str | None = None  # answer 307 with this Location (completions and /models)
    endless_error: bool = False  # with fail_status: an error body that never ends
    stream: bool = True  # False: answer with one JSON completion even when asked to stream
    embedding_dims: int = 64  # /v1/embeddings: vector size (bag of hashed words, unit length)
    embedding_usage: bool = True  # /v1/embeddings: report usage.prompt_tokens
    embedding_shuffle: bool = False  # /v1/embeddings: list the vectors in reverse index order
    embedding_drop_last: bool = False  # /v1/embeddings: a malformed answer, one vector short
    # Relay tests: stream exactly these bytes (SSE as some upstream frames it) instead of tokens,
    # written in pieces cut at `script_cuts` (byte offsets), a moment apart so that each piece
    # reaches the client as a read of its own; `answer`: the JSON answer when not streaming.
    script: bytes | None = None
    script_cuts: list[int] = field(default_factory=list)
    answer: dict[str, Any] | None = None


@dataclass
class StubStats:
    requests: int = 0
    completed: int = 0
    cancelled: int = 0
    failed: int = 0
    models: int = 0  # GET /models (health checks)
    bytes_sent: int = 0  # token chunks written to streams
    bodies: list[dict[str, Any]] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)


class StubUpstream:
    def __init__(self, config: StubConfig | None = None, *, keep_bodies: bool = True) -> None:
        self.config = config or StubConfig()
        self.stats = StubStats()
        self.keep_bodies = keep_bodies
        self._runner: web.AppRunner | None = None
        self.port = 0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._complete)
        app.router.add_post("/v1/completions", self._complete)
        app.router.add_post("/v1/embeddings", self._embeddings)
        app.router.add_get("/v1/models", self._models)
        return app

    async def start(self, port: int = 0, host: str = "127.0.0.1") -> StubUpstream:
        # handler_cancellation: a client that goes away cancels the handler, which we count.
        self._runner = web.AppRunner(self.app(), handler_cancellation=True, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port, backlog=4096)
        await site.start()
        self.port = self._runner.addresses[0][1]
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _models(self, request: web.Request) -> web.Response:
        self.stats.models += 1
        if self.config.redirect_to is not None:
            return web.Response(status=307, headers={"Location": self.config.redirect_to})
        if self.config.fail_status is not None and self.config.fail_times is None:
            return web.json_response({"error": {"message": "down"}}, status=503)
        return web.json_response({"object": "list", "data": [{"id": "stub", "object": "model"}]})

    async def _complete(self, request: web.Request) -> web.StreamResponse:
        cfg, stats = self.config, self.stats
        stats.requests += 1
        body = orjson.loads(await request.read())
        if self.keep_bodies:
            stats.bodies.append(body)
            stats.headers.append(dict(request.headers))
        try:
            if cfg.redirect_to is not None:
                return web.Response(status=307, headers={"Location": cfg.redirect_to})
            if cfg.hang:
                await asyncio.sleep(3600)
            if cfg.delay:
                await asyncio.sleep(cfg.delay)
            if cfg.fail_status is not None and (
                cfg.fail_times is None or stats.requests <= cfg.fail_times
            ):
                stats.failed += 1
                if cfg.endless_error:
                    return await self._endless_error(request, cfg.fail_status)
                headers = {"Retry-After": cfg.retry_after} if cfg.retry_after else None
                err = {"message": f"stub failure {cfg.fail_status}", "type": "server_error"}
                return web.json_response({"error": err}, status=cfg.fail_status, headers=headers)
            prompt = orjson.dumps(body.get("messages") or body.get("prompt") or "")
            if cfg.context_limit is not None and len(prompt) > cfg.context_limit:
                stats.failed += 1
                err = {
                    "message": f"maximum context length is {cfg.context_limit}",
                    "type": "invalid_request_error",
                    "code": "context_length_exceeded",
                }
                return web.json_response({"error": err}, status=400)
            if not body.get("stream") or not cfg.stream:
                stats.completed += 1
                return web.json_response(cfg.answer or _whole(body, cfg))
            return await self._stream(request, body, cfg)
        except asyncio.CancelledError:
            stats.cancelled += 1
            raise

    async def _embeddings(self, request: web.Request) -> web.Response:
        """OpenAI's embeddings endpoint with deterministic vectors: each word (or token id) is
        hashed into one of `embedding_dims` buckets, so texts sharing words are close, as a
        similarity search needs. The same failure knobs as completions apply."""
        cfg, stats = self.config, self.stats
        stats.requests += 1
        body = orjson.loads(await request.read())
        if self.keep_bodies:
            stats.bodies.append(body)
            stats.headers.append(dict(request.headers))
        try:
            if cfg.redirect_to is not None:
                return web.Response(status=307, headers={"Location": cfg.redirect_to})
            if cfg.hang:
                await asyncio.sleep(3600)
            if cfg.delay:
                await asyncio.sleep(cfg.delay)
            if cfg.fail_status is not None and (
                cfg.fail_times is None or stats.requests <= cfg.fail_times
            ):
                stats.failed += 1
                headers = {"Retry-After": cfg.retry_after} if cfg.retry_after else None
                err = {"message": f"stub failure {cfg.fail_status}", "type": "server_error"}
                return web.json_response({"error": err}, status=cfg.fail_status, headers=headers)
            raw = body.get("input")
            if isinstance(raw, str) or (raw and isinstance(raw[0], int)):
                raw = [raw]
            items: list[str | list[int]] = raw or []
            longest = max((len(x) for x in items), default=0)
            if cfg.context_limit is not None and longest > cfg.context_limit:
                stats.failed += 1
                err = {
                    "message": f"input is longer than the maximum context length "
                    f"{cfg.context_limit}",
                    "type": "invalid_request_error",
                }
                return web.json_response({"error": err}, status=400)
            data = []
            for i, item in enumerate(items):
                vec = stub_embedding(item, cfg.embedding_dims)
                value: list[float] | str = vec
                if body.get("encoding_format") == "base64":
                    value = base64.b64encode(array("f", vec).tobytes()).decode()
                data.append({"object": "embedding", "index": i, "embedding": value})
            if cfg.embedding_shuffle:
                data.reverse()
            if cfg.embedding_drop_last:
                data.pop()
            answer: dict[str, Any] = {"object": "list", "data": data, "model": body.get("model")}
            if cfg.embedding_usage:
                tokens = sum(len(x.split()) if isinstance(x, str) else len(x) for x in items)
                answer["usage"] = {"prompt_tokens": tokens, "total_tokens": tokens}
            stats.completed += 1
            return web.json_response(answer)
        except asyncio.CancelledError:
            stats.cancelled += 1
            raise

    async def _endless_error(self, request: web.Request, status: int) -> web.StreamResponse:
        resp = web.StreamResponse(status=status, headers={"Content-Type": "application/json"})
        await resp.prepare(request)
        with contextlib.suppress(ConnectionError):  # until the client hangs up
            await resp.write(b'{"error": {"message": "stub failure", "padding": "')
            pad = b" " * 65536
            while True:
                await resp.write(pad)
                self.stats.bytes_sent += len(pad)
        return resp

    async def _stream(
        self, request: web.Request, body: dict[str, Any], cfg: StubConfig
    ) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        if cfg.script is not None:
            return await self._scripted(resp, cfg.script, cfg.script_cuts)
        chat = "messages" in body
        n = min(cfg.tokens, int(body.get("max_tokens") or cfg.tokens))
        head = _frame_head(body.get("model", "stub"), chat)
        text = orjson.dumps(cfg.token)
        if chat:
            await resp.write(head + b'"delta":{"role":"assistant","content":""}}]}\n\n')
            piece = head + b'"delta":{"content":' + text + b"}}]}\n\n"
        else:
            if cfg.first_token_delay:  # an opening chunk without text, as some servers send
                await resp.write(head + b'"text":""}]}\n\n')
            piece = head + b'"text":' + text + b"}]}\n\n"
        if cfg.first_token_delay:
            await asyncio.sleep(cfg.first_token_delay)
        for i in range(n):
            if cfg.die_after is not None and i == cfg.die_after:
                assert request.transport is not None
                request.transport.abort()  # an abrupt reset mid-stream
                return resp
            if cfg.stall_after is not None and i == cfg.stall_after:
                await asyncio.sleep(3600)
            await resp.write(piece)
            self.stats.bytes_sent += len(piece)
            if cfg.interval:
                await asyncio.sleep(cfg.interval)
        last = b'"delta":{}' if chat else b'"text":""'
        await resp.write(head.replace(b"null", b'"length"') + last + b"}]}\n\n")
        if cfg.usage and (body.get("stream_options") or {}).get("include_usage"):
            prompt_tokens = len(orjson.dumps(body.get("messages") or body.get("prompt"))) // 4
            usage = {
                "id": "stub",
                "object": "chat.completion.chunk" if chat else "text_completion",
                "created": int(time.time()),
                "model": body.get("model", "stub"),
                "choices": [],
                "usage": {
                    "prompt_tokens": prompt_tokens,
                    "completion_tokens": n,
                    "total_tokens": prompt_tokens + n,
                },
            }
            await resp.write(b"data: " + orjson.dumps(usage) + b"\n\n")
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        self.stats.completed += 1
        return resp

    async def _scripted(
        self, resp: web.StreamResponse, script: bytes, cuts: list[int]
    ) -> web.StreamResponse:
        bounds = [0, *cuts, len(script)]
        for i, (start, end) in enumerate(itertools.pairwise(bounds)):
            if i:
                await asyncio.sleep(0.002)
            await resp.write(script[start:end])
        await resp.write_eof()
        self.stats.completed += 1
        return resp


def stub_embedding(item: str | list[int], dims: int) -> list[float]:
    """A bag of hashed words (or token ids), unit length: deterministic, and close for texts
    that share words."""
    vec = [0.0] * dims
    words = item.lower().split() if isinstance(item, str) else [str(t) for t in item]
    for word in words:
        digest = hashlib.blake2b(word.strip(".,;:!?").encode(), digest_size=4).digest()
        vec[int.from_bytes(digest, "little") % dims] += 1.0
    norm = math.sqrt(sum(v * v for v in vec)) or 1.0
    return [v / norm for v in vec]


def _frame_head(model: str, chat: bool) -> bytes:
    """A chunk frame up to its choice's content, pre-encoded so each token costs one
    concatenation (the stub must be much cheaper than what it measures)."""
    obj = b"chat.completion.chunk" if chat else b"text_completion"
    created = str(int(time.time())).encode()
    return (
        b'data: {"id":"stub","object":"' + obj + b'","created":' + created
        + b',"model":' + orjson.dumps(model)
        + b',"choices":[{"index":0,"finish_reason":null,'
    )  # fmt: skip


def _whole(body: dict[str, Any], cfg: StubConfig) -> dict[str, Any]:
    n = min(cfg.tokens, int(body.get("max_tokens") or cfg.tokens))
    text = cfg.token * n
    chat = "messages" in body
    choice: dict[str, Any] = {"index": 0, "finish_reason": "length"}
    if chat:
        choice["message"] = {"role": "assistant", "content": text}
    else:
        choice["text"] = text
    return {
        "id": "stub",
        "object": "chat.completion" if chat else "text_completion",
        "created": int(time.time()),
        "model": body.get("model", "stub"),
        "choices": [choice],
        "usage": {"prompt_tokens": 1, "completion_tokens": n, "total_tokens": n + 1},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9100)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--interval", type=float, default=0.0, help="seconds between tokens")
    parser.add_argument("--fail-status", type=int)
    parser.add_argument("--retry-after")
    parser.add_argument("--hang", action="store_true")
    parser.add_argument("--stall-after", type=int)
    parser.add_argument("--die-after", type=int)
    args = parser.parse_args()
    config = StubConfig(
        tokens=args.tokens,
        interval=args.interval,
        fail_status=args.fail_status,
        retry_after=args.retry_after,
        hang=args.hang,
        stall_after=args.stall_after,
        die_after=args.die_after,
    )

    async def serve() -> None:
        stub = await StubUpstream(config, keep_bodies=False).start(args.port, args.host)
        print(f"stub upstream on {stub.base_url}", flush=True)  # noqa: T201 - CLI output
        await asyncio.Event().wait()

    with contextlib.suppress(ImportError):
        import uvloop

        uvloop.install()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve())


if __name__ == "__main__":
    main()
