"""Any OpenAI-compatible upstream (vLLM, Ollama, llama.cpp's server, OpenAI).

One pooled aiohttp session per upstream (aiohttp sustains several times httpx's request rate on
this hardware, see PERFORMANCE.md). The upstream gets the client's body as it came, model name
and stream settings replaced (upstream_wire.py). We always ask it to stream, with usage, and pass
its output on as it arrives, every field of it; a non-streaming client request simply collects
the same stream. Errors are mapped to our taxonomy; messages never carry the upstream URL or key.

Text that arrives in one TCP read leaves as one chunk (vLLM's `--stream-interval` does the
same at the source): a gateway that has fallen behind catches up with one delta instead of
paying the whole per-chunk path (service layers, chunk model, framing) once per token. Nothing
waits for later bytes, so this adds no latency; the token count travels with the chunk.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import os
import re
from array import array
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Annotated, Any

import aiohttp
import msgspec
import orjson
import structlog
import yarl

from llm_api.core.exceptions import (
    APIError,
    ContextLengthExceededError,
    InvalidRequestError,
    RateLimitError,
    UpstreamError,
    UpstreamTimeoutError,
)
from llm_api.services import tracing
from llm_api.services.llm.backends.upstream_connector import upstream_connector
from llm_api.services.llm.backends.upstream_wire import (
    Rich,
    cached_tokens,
    dict_calls,
    dict_extra,
    dict_logprobs,
    dict_reasoning,
    finish_reason,
    request_body,
    usage_extra,
)
from llm_api.services.llm.registry import ModelConfig
from llm_api.services.llm.types import Frame, GenerationRequest

log = structlog.get_logger(__name__)
_URL = re.compile(r"(https?|wss?)://\S+")
# What one upstream response may make us hold. An SSE line (one event) is at most a few KB from
# any real server; a whole answer in one event stays well inside the bound. A read takes at most
# MAX_READ_BYTES of what has arrived, so one chunk passed on (and held while a slow client reads,
# api/streaming.py) is never the whole of a backlog. An error body is only read for its message.
MAX_LINE_BYTES = 1024 * 1024  # one SSE line larger than this is refused
MAX_READ_BYTES = 64 * 1024  # below MAX_LINE_BYTES: a line within one read always fits
MAX_ERROR_BYTES = 64 * 1024
MAX_BODY_BYTES = 4 * 1024 * 1024  # a whole JSON answer, from an upstream that ignored `stream`
# An embeddings answer: the service sends at most `embedding_upstream_batch` inputs per call
# (256 by default), and 256 vectors of 4,096 floats as JSON are ~25 MiB.
MAX_EMBEDDINGS_BYTES = 64 * 1024 * 1024


# Typed views of the upstream's chunks. msgspec decodes a read's payloads straight into them:
# the chunk and choice fields we do not read (ids, timestamps, system fingerprints) are skipped
# without building objects, and those we read are type-checked in C. That was ~5% of a proxied
# stream's instructions (bench/RESULTS.md) against orjson dicts walked with a type check per
# field. A read that does not fit (an error object, a malformed or hostile chunk, a count that
# is not a non-negative int) takes the orjson path, which handles every odd case as before.
# `gc=False`: decoded JSON cannot form a reference cycle, so the collector need not track these
# (~20% off the decode, and fewer young-generation collections).
#
# This view is for text only, and nothing of a delta may be lost: it refuses delta fields it
# does not name (`forbid_unknown_fields`), and names with type None those that servers send as
# null in text chunks (OpenAI's `refusal`, SGLang's `tool_calls` and `reasoning_content`, choice
# `logprobs`). A read with tool-call pieces, reasoning, logprobs, a refusal or any field nobody
# knows yet fails it and takes the orjson path, which relays them all (upstream_wire.Rich). Each
# field named here costs every text chunk's decode ~50 instructions: they are kept few.
class _Delta(msgspec.Struct, gc=False, forbid_unknown_fields=True):
    content: str | None = None
    role: str | None = None
    refusal: None = None
    tool_calls: None = None
    reasoning_content: None = None


class _Choice(msgspec.Struct, gc=False):
    delta: _Delta | None = None
    text: str | None = None
    finish_reason: str | None = None
    logprobs: None = None


_Tokens = Annotated[int, msgspec.Meta(ge=0)]


class _Usage(msgspec.Struct, gc=False, forbid_unknown_fields=True):
    prompt_tokens: _Tokens | None = None
    completion_tokens: _Tokens | None = None
    total_tokens: int | None = None
    prompt_tokens_details: dict[str, Any] | None = None
    completion_tokens_details: dict[str, Any] | None = None


class _Chunk(msgspec.Struct, gc=False):
    choices: list[_Choice] | None = None
    usage: _Usage | None = None
    # No JSON value fits: a chunk with an `error` at all (even null) fails the typed decode, and
    # the orjson path reports it.
    error: msgspec.UnsetType = msgspec.UNSET


_CHUNKS = msgspec.json.Decoder(list[_Chunk])


class OpenAIUpstreamBackend:
    def __init__(self, config: ModelConfig) -> None:
        if not config.base_url:
            raise ValueError(f"model {config.id}: base_url is required for the openai backend")
        self.config = config
        # Absolute URLs made once (the session has no base URL): a relative one would be parsed
        # and joined to a base on every request.
        self._urls = {
            path: yarl.URL(f"{config.base_url.rstrip('/')}/{path}")
            for path in ("chat/completions", "completions", "embeddings")
        }
        self._session: aiohttp.ClientSession | None = None

    @property
    def ready(self) -> bool:
        return self._session is not None and not self._session.closed

    async def start(self, warmup: bool = True) -> None:
        # `identity`: a stream is passed on as it arrives, with nothing to decompress (and so
        # nothing for upstream_connector.StreamProtocol to resume).
        headers = {"Content-Type": "application/json", "Accept-Encoding": "identity"}
        if self.config.api_key_env:
            key = os.environ.get(self.config.api_key_env)
            if not key:
                raise RuntimeError(
                    f"model {self.config.id}: environment variable "
                    f"{self.config.api_key_env} is not set"
                )
            headers["Authorization"] = f"Bearer {key}"
        self._session = aiohttp.ClientSession(
            headers=headers,
            connector=upstream_connector(self.config.max_connections),
            auto_decompress=False,
            # The response buffer pauses the socket past twice this (aiohttp's high-water mark):
            # what a stream not being read (a slow client, api/streaming.py) holds of the upstream.
            read_bufsize=MAX_READ_BYTES,
            timeout=aiohttp.ClientTimeout(
                total=None, sock_connect=self.config.connect_timeout, connect=None
            ),
            trust_env=False,  # never route through a proxy picked up from the environment
        )

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def prepare(self, request: GenerationRequest) -> None:
        """Upstreams validate context length themselves; nothing to count locally."""

    async def _post(
        self,
        path: str,
        payload: bytes,
        deadline: float,
        headers: dict[str, str] | None = None,
    ) -> aiohttp.ClientResponse:
        """POST `payload` to the upstream's `path`, its response head due by `deadline`. Never
        follows a redirect: it would send the prompt and our key to wherever the `Location`
        points; a 3xx is the upstream's error (`_map_error`)."""
        if self._session is None:
            raise UpstreamError("Upstream is not connected.")
        try:
            async with asyncio.timeout_at(deadline):
                return await self._session.post(
                    self._urls[path], data=payload, headers=headers, allow_redirects=False
                )
        except TimeoutError:
            raise UpstreamTimeoutError(
                "The upstream model server did not answer in time."
            ) from None
        except aiohttp.ClientError:
            raise UpstreamError("Could not connect to the upstream model server.") from None

    async def embed(self, inputs: list[str] | list[list[int]]) -> UpstreamEmbeddings:
        """POST /embeddings: one vector per input, in input order (the upstream's `index` decides,
        not its list order). Floats are asked for: every OpenAI-compatible server (Ollama and
        older llama.cpp servers included) answers them; base64 is this server's to make."""
        body = {"model": self.config.upstream_model or self.config.id, "input": inputs}
        deadline = asyncio.get_running_loop().time() + self.config.first_token_timeout
        resp = await self._post("embeddings", orjson.dumps(body), deadline)
        async with resp:
            if resp.status >= 300:
                exc = await _map_error(resp, deadline)
                if isinstance(exc, InvalidRequestError):  # the client's input, not messages
                    exc.param = "input"
                raise exc
            try:
                raw = await _read_at_most(resp, deadline, MAX_EMBEDDINGS_BYTES + 1)
            except TimeoutError:
                raise UpstreamTimeoutError(
                    "The upstream model server did not answer in time."
                ) from None
            except aiohttp.ClientError:
                raise UpstreamError("The upstream connection failed mid-response.") from None
        if len(raw) > MAX_EMBEDDINGS_BYTES:
            raise UpstreamError("The upstream sent an oversized response.")
        return _embeddings(raw, len(inputs))

    async def generate(self, request: GenerationRequest) -> AsyncGenerator[Frame, None]:
        path, body = request_body(self.config, request)
        payload = orjson.dumps(body)
        # One deadline covers the response headers, an error body, and the first content.
        deadline = asyncio.get_running_loop().time() + self.config.first_token_timeout
        # A traced request continues its trace upstream (W3C traceparent: vLLM, llama.cpp's
        # server and most gateways read it); untraced, nothing is added.
        headers = tracing.traceparent(request.trace) if request.trace is not None else None
        resp = await self._post(path, payload, deadline, headers)
        async with resp:
            if resp.status >= 300:
                raise await _map_error(resp, deadline)
            if resp.headers.get("Content-Encoding", "identity").lower() not in ("identity", ""):
                raise UpstreamError("The upstream sent a compressed stream, which we refused.")
            if resp.headers.get("Content-Type", "").startswith("application/json"):
                # One whole answer: the upstream ignored `stream` (some do).
                whole = await _whole(resp, deadline, _estimate_prompt_tokens(request))
                self._bound_usage(whole, request.params.max_tokens, len(payload))
                yield whole
                return
            async for chunk in self._read(resp, deadline, _estimate_prompt_tokens(request)):
                if chunk.finish_reason is not None:
                    self._bound_usage(chunk, request.params.max_tokens, len(payload))
                yield chunk

    def _bound_usage(self, chunk: Frame, max_tokens: int, payload_bytes: int) -> None:
        """Usage as reported, unless it is more than the request could have produced: then the
        most it could have (usage feeds the rate limits and the ledger, which must not take an
        upstream's 2e15 at its word). No tokenizer makes more prompt tokens than the bytes it is
        given (the JSON framing outweighs a chat template's few tokens per message), and the
        upstream was asked for at most `max_tokens`."""
        prompt, completion = chunk.prompt_tokens or 0, chunk.completion_tokens or 0
        if prompt <= payload_bytes and completion <= max_tokens:
            return
        log.warning(
            "upstream_usage_implausible",
            model=self.config.id,
            prompt_tokens=prompt,
            completion_tokens=completion,
            max_prompt_tokens=payload_bytes,
            max_completion_tokens=max_tokens,
        )
        chunk.prompt_tokens = min(prompt, payload_bytes)
        chunk.completion_tokens = min(completion, max_tokens)

    async def _read(
        self, resp: aiohttp.ClientResponse, deadline: float, prompt_estimate: int
    ) -> AsyncIterator[Frame]:
        totals = _Totals()
        pieces = 0
        loop = asyncio.get_running_loop()
        # Read whatever bytes have arrived (up to MAX_READ_BYTES) and split them into lines
        # here, rather than one `readline()` (and one timeout context) per line: an upstream that
        # sends many chunks per TCP read costs one await per read, not per chunk. Bytes already
        # buffered are taken without a timer: only a read that has to wait runs under the
        # deadline. That is the first-token deadline until the first text arrives (a role-only
        # first chunk, or a keep-alive comment, is no token), then the idle timeout, moved on
        # after each read with complete lines has been handed on: time a slow client takes to
        # read it is not the upstream's silence. Anything a model produced counts as started:
        # text, reasoning, a tool call's first piece, a refusal.
        content = resp.content
        tail = b""
        done = False
        started = False  # content has arrived: the idle timeout applies
        last: Frame | None = None  # the final read's last frame, held for the end
        while not done:
            try:
                data = content.read_nowait(MAX_READ_BYTES)
                if not data and not content.at_eof():
                    async with asyncio.timeout_at(deadline):
                        data = await content.read(MAX_READ_BYTES)
            except TimeoutError:
                raise UpstreamTimeoutError(
                    "The upstream model server stopped sending tokens."
                    if started
                    else "The upstream model server did not answer in time."
                ) from None
            except aiohttp.ClientError:
                raise UpstreamError("The upstream connection failed mid-response.") from None
            if data:
                # Only a line begun in an earlier read can be longer than one read: its length so
                # far is checked (a `find` up to its end, only when one was left over).
                if tail:
                    end = data.find(b"\n")
                    if len(tail) + (end if end >= 0 else len(data)) > MAX_LINE_BYTES:
                        raise UpstreamError("The upstream sent an oversized chunk.")
                buf = tail + data
                cut = buf.rfind(b"\n") + 1  # the read's complete lines end here
                block, tail = buf[:cut], buf[cut:]
            else:  # EOF: a last line without its newline still counts
                block, tail, done = tail, b"", True
            texts: list[str] = []  # this read's text pieces, sent on as one chunk
            error: str | None = None  # raised after the text before it has been sent
            typed = None
            canonical = _split_canonical(block)
            if canonical is not None:
                array, count, ended = canonical
                typed = _decode_array(array, count)
            if typed is None:  # other framing, or a read the typed view does not fit
                payloads, ended = _split_lines(block)
                typed = _decode_typed(payloads)
            done = done or ended
            rich = None
            if typed is not None:
                _fold_typed(typed, texts, totals)
            else:
                error, rich = _fold_dicts(_decode(payloads), texts, totals)
            # Text alone (most reads): one frame, as it always was. Otherwise Rich's frames.
            frames: Sequence[Frame] = ()
            if rich is not None:
                frames = rich.close()
            elif texts:
                frames = (Frame(text="".join(texts), tokens=len(texts)),)
            if frames:
                started = True
                for frame in frames[:-1]:
                    pieces += frame.tokens
                    yield frame
                last = frames[-1]
                pieces += last.tokens
                if not (done and error is None and totals.finish is not None):
                    yield last
                    last = None
            if error is not None:
                raise UpstreamError(error)
            if started and block:
                deadline = loop.time() + self.config.idle_timeout
        if totals.finish is None:
            raise UpstreamError("The upstream closed the stream before finishing.")
        prompt, completion = totals.prompt_tokens, totals.completion_tokens
        # The last frame of the read that ended the stream leaves with its end, as one chunk:
        # one item fewer through every layer up to the socket.
        closing = last if last is not None else Frame()
        closing.finish_reason = finish_reason(totals.finish)
        closing.prompt_tokens = prompt if prompt is not None else prompt_estimate
        # Counted chunks approximate tokens when an upstream does not report usage.
        closing.completion_tokens = completion if completion is not None else pieces
        closing.cached_tokens = totals.cached_tokens
        closing.usage_extra = totals.usage_extra
        yield closing


_DONE = b"data: [DONE]\n\n"


def _split_canonical(block: bytes) -> tuple[bytes, int, bool] | None:
    """A block of complete lines in the framing every OpenAI-compatible server uses, one
    `data: <json>\n\n` per event: its payloads as one JSON array, how many, and whether
    `[DONE]` ended them. None for any other framing (CRLF, comments, `event:` lines, `data:`
    without its space), which `_split_lines` reads.

    Why: a few C-level byte operations over the read instead of a Python step per line (half
    the time for a 36-event read). It is exact: once the block is split at every `\n\ndata: `,
    a newline left in a piece would be one outside that framing; with none left, each piece is a
    whole line's value. A `[DONE]` that is not the read's last event stays in the array, which then
    fails to decode, and the read goes line by line."""
    done = False
    if block.endswith(_DONE) and (len(block) == len(_DONE) or block[-16:-14] == b"\n\n"):
        block, done = block[: -len(_DONE)], True
    if not block:
        return b"[]", 0, done
    if not (block.startswith(b"data: ") and block.endswith(b"\n\n")):
        return None
    payloads = block[6:-2].split(b"\n\ndata: ")
    body = b",".join(payloads)
    if b"\n" in body:
        return None
    return b"[" + body + b"]", len(payloads), done


def _split_lines(block: bytes) -> tuple[list[bytes], bool]:
    """Any SSE framing: the `data:` payloads of a block of lines, up to `[DONE]`, and whether it
    came. Fields start at the line's start; blank separators, comments and other fields are
    skipped."""
    payloads = [line[5:].strip() for line in block.split(b"\n") if line.startswith(b"data:")]
    if b"[DONE]" in payloads:
        return payloads[: payloads.index(b"[DONE]")], True
    return payloads, False


def _decode_typed(payloads: list[bytes]) -> list[_Chunk] | None:
    """A read's payloads as typed chunks, with one msgspec call; None when any of them does not
    fit (then `_decode` and the dict path take the whole read)."""
    return _decode_array(b"[" + b",".join(payloads) + b"]", len(payloads))


def _decode_array(array: bytes, count: int) -> list[_Chunk] | None:
    """`count` payloads joined into one JSON array, as typed chunks (see `_decode_typed`)."""
    if not count:
        return []
    try:
        chunks = _CHUNKS.decode(array)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None
    if len(chunks) != count:
        return None  # a payload held several values
    return chunks


@dataclass(slots=True)
class _Totals:
    """What a stream's chunks said so far, besides content: the last finish reason and usage."""

    finish: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cached_tokens: int | None = None
    usage_extra: dict[str, Any] | None = None  # the usage's details, verbatim


def _fold_typed(chunks: list[_Chunk], texts: list[str], totals: _Totals) -> None:
    """A read's typed chunks (text only, by the view's types): text pieces appended to `texts`,
    finish and usage into `totals`."""
    append = texts.append
    for chunk in chunks:
        for choice in chunk.choices or ():
            delta = choice.delta
            text = delta.content if delta is not None else None
            if not text:
                text = choice.text
            if text:
                append(text)
            if choice.finish_reason:
                totals.finish = choice.finish_reason
        usage = chunk.usage
        if usage is not None:
            if usage.prompt_tokens is not None:
                totals.prompt_tokens = usage.prompt_tokens
            if usage.completion_tokens is not None:
                totals.completion_tokens = usage.completion_tokens
            if usage.prompt_tokens_details is not None or usage.completion_tokens_details:
                _usage_details(
                    totals,
                    {
                        "prompt_tokens_details": usage.prompt_tokens_details,
                        "completion_tokens_details": usage.completion_tokens_details,
                    },
                )


def _usage_details(totals: _Totals, usage: dict[str, Any]) -> None:
    extra = usage_extra(usage)
    if extra is not None:
        totals.usage_extra = extra
        totals.cached_tokens = cached_tokens(extra.get("prompt_tokens_details"))


def _fold_dicts(
    objs: list[Any], texts: list[str], totals: _Totals
) -> tuple[str | None, Rich | None]:
    """The same for chunks decoded as plain JSON, of any shape: what is not what we expect is
    ignored, except an error object or a chunk that is not an object, whose message is returned
    (the content before it is kept). Delta fields we do not interpret go on verbatim."""
    append = texts.append
    rich: Rich | None = None
    # `type(x) is` rather than isinstance: a JSON decoder makes exact types.
    for obj in objs:
        if type(obj) is not dict:
            obj = {"error": "The upstream sent a malformed chunk."}
        if "error" in obj:
            return _clean(_error_message(obj)), rich
        choices = obj.get("choices")
        for choice in choices if type(choices) is list else ():
            if type(choice) is not dict:
                continue
            delta = choice.get("delta")
            text = delta.get("content") if type(delta) is dict else None
            if not text:
                text = choice.get("text")
            text = text if text and type(text) is str else None
            logprobs = dict_logprobs(choice.get("logprobs"))
            if type(delta) is dict:
                reasoning = dict_reasoning(delta)
                calls = dict_calls(delta.get("tool_calls"))
                extra = dict_extra(delta)
            else:
                reasoning = calls = extra = None
            if reasoning or calls or logprobs or extra:
                if rich is None:
                    rich = Rich(texts)
                rich.add(text, reasoning, calls, logprobs, extra)
            elif text:
                append(text)
            if choice.get("finish_reason"):
                totals.finish = str(choice["finish_reason"])
        usage = obj.get("usage")
        if usage and type(usage) is dict:
            totals.prompt_tokens = _count(usage.get("prompt_tokens"), totals.prompt_tokens)
            totals.completion_tokens = _count(
                usage.get("completion_tokens"), totals.completion_tokens
            )
            _usage_details(totals, usage)
    return None, rich


def _decode(payloads: list[bytes]) -> list[Any]:
    """A read's `data:` payloads, decoded with one orjson call (as one JSON array) instead of
    one call each. If that fails, or a payload held more than one value, they are decoded one by
    one, so a malformed payload is found where it was (None) after the good ones before it."""
    if not payloads:
        return []
    try:
        objs = orjson.loads(b"[" + b",".join(payloads) + b"]")
    except orjson.JSONDecodeError:
        objs = None
    if type(objs) is list and len(objs) == len(payloads):
        return objs
    decoded: list[Any] = []
    for payload in payloads:
        try:
            decoded.append(orjson.loads(payload))
        except orjson.JSONDecodeError:
            decoded.append(None)
    return decoded


def _count(value: Any, default: int | None) -> int | None:
    """A token count from an upstream's usage, if it is one (a hostile upstream's junk is not)."""
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= 0
    return value if ok else default


def _estimate_prompt_tokens(request: GenerationRequest) -> int:
    """For upstreams that report no usage in their stream (llama-cpp-python's server ignores
    `stream_options`): ~4 characters per token, so usage and token limits never see a free
    prompt. Upstreams that report usage are taken at their word."""
    chars = sum(len(m.content) for m in request.messages or []) + len(request.prompt or "")
    return max(1, -(-chars // 4))


def _error_message(obj: Any) -> str:
    err = obj.get("error") if isinstance(obj, dict) else None
    if isinstance(err, dict):
        return str(err.get("message") or "")
    if isinstance(err, str):
        return err
    return str(obj.get("message") or obj.get("detail") or "") if isinstance(obj, dict) else ""


def _clean(message: str) -> str:
    return _URL.sub("[upstream]", message)[:500] or "Upstream error."


async def _read_at_most(resp: aiohttp.ClientResponse, deadline: float, limit: int) -> bytes:
    """A body, or its first `limit` bytes, read by `deadline`. What is left unread is dropped with
    the connection when the response is released."""
    parts: list[bytes] = []
    left = limit
    async with asyncio.timeout_at(deadline):
        while left > 0 and (data := await resp.content.read(left)):
            parts.append(data)
            left -= len(data)
    return b"".join(parts)


async def _error_body(resp: aiohttp.ClientResponse, deadline: float) -> bytes:
    """At most MAX_ERROR_BYTES of an error body: the message is all we want from it, and an
    upstream must not make us hold (or wait for) more."""
    try:
        return await _read_at_most(resp, deadline, MAX_ERROR_BYTES)
    except (TimeoutError, aiohttp.ClientError):
        return b""  # the status alone decides


async def _whole(resp: aiohttp.ClientResponse, deadline: float, prompt_estimate: int) -> Frame:
    """A non-streamed answer (one JSON completion, chat or legacy), read whole up to
    MAX_BODY_BYTES by the first-token deadline, as the stream's one and last chunk."""
    try:
        raw = await _read_at_most(resp, deadline, MAX_BODY_BYTES + 1)
    except TimeoutError:
        raise UpstreamTimeoutError("The upstream model server did not answer in time.") from None
    except aiohttp.ClientError:
        raise UpstreamError("The upstream connection failed mid-response.") from None
    if len(raw) > MAX_BODY_BYTES:
        raise UpstreamError("The upstream sent an oversized response.")
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError:
        obj = None
    if type(obj) is not dict:
        raise UpstreamError("The upstream sent a malformed response.")
    if "error" in obj:
        raise UpstreamError(_clean(_error_message(obj)))
    choices = obj.get("choices")
    choice = choices[0] if type(choices) is list and choices else None
    if type(choice) is not dict:
        raise UpstreamError("The upstream sent a malformed response.")
    message = choice.get("message")
    text = message.get("content") if type(message) is dict else choice.get("text")
    text = text if type(text) is str else ""
    found = obj.get("usage")
    usage: dict[str, Any] = found if isinstance(found, dict) else {}
    prompt = _count(usage.get("prompt_tokens"), None)
    completion = _count(usage.get("completion_tokens"), None)
    details = usage_extra(usage)
    reason = choice.get("finish_reason")
    frame = Frame(
        text=text,
        tokens=1 if text else 0,
        finish_reason=finish_reason(reason if type(reason) is str else None),
        prompt_tokens=prompt if prompt is not None else prompt_estimate,
        # ~4 characters a token when the upstream does not say, as for prompts.
        completion_tokens=completion if completion is not None else -(-len(text) // 4),
        logprobs=dict_logprobs(choice.get("logprobs")),
        usage_extra=details,
        cached_tokens=cached_tokens(details.get("prompt_tokens_details")) if details else None,
    )
    if type(message) is dict:
        # Whole calls, in order: each one piece with its id, name and all its arguments.
        frame.tool_calls = dict_calls(message.get("tool_calls"))
        frame.reasoning = dict_reasoning(message)
        frame.extra = dict_extra(message)
        if frame.tool_calls or frame.reasoning or frame.extra:
            frame.tokens = 1
    return frame


@dataclass(slots=True)
class UpstreamEmbeddings:
    vectors: list[list[float]]  # in input order
    prompt_tokens: int | None  # None when the upstream reports no usage


class _Embedding(msgspec.Struct, gc=False):
    index: Annotated[int, msgspec.Meta(ge=0)]
    embedding: list[float] | str  # floats, or base64 little-endian float32


class _EmbeddingUsage(msgspec.Struct, gc=False):
    prompt_tokens: _Tokens | None = None


class _Embeddings(msgspec.Struct, gc=False):
    data: list[_Embedding]
    usage: _EmbeddingUsage | None = None


_EMBEDDINGS = msgspec.json.Decoder(_Embeddings)


def _embeddings(raw: bytes, count: int) -> UpstreamEmbeddings:
    """The upstream's embeddings answer, checked: one vector per input, each index once, every
    vector the same non-zero length. Anything else is the upstream's fault (502)."""
    try:
        answer = _EMBEDDINGS.decode(raw)
    except msgspec.DecodeError:
        try:
            obj = orjson.loads(raw)
        except orjson.JSONDecodeError:
            obj = None
        if isinstance(obj, dict) and "error" in obj:
            raise UpstreamError(_clean(_error_message(obj))) from None
        raise UpstreamError("The upstream sent a malformed embeddings response.") from None
    vectors: list[list[float] | None] = [None] * count
    for item in answer.data:
        if item.index >= count or vectors[item.index] is not None:
            raise UpstreamError("The upstream sent a malformed embeddings response.")
        vec = item.embedding
        if isinstance(vec, str):
            try:
                vec = array("f", base64.b64decode(vec, validate=True)).tolist()
            except (ValueError, binascii.Error):
                raise UpstreamError("The upstream sent a malformed embeddings response.") from None
        vectors[item.index] = vec
    found = [v for v in vectors if v is not None]
    if len(found) != count or not found[0] or any(len(v) != len(found[0]) for v in found):
        raise UpstreamError("The upstream sent a malformed embeddings response.")
    tokens = answer.usage.prompt_tokens if answer.usage is not None else None
    return UpstreamEmbeddings(found, tokens)


async def _map_error(resp: aiohttp.ClientResponse, deadline: float) -> APIError:
    status = resp.status
    if status < 400:
        log.warning("upstream_error", status=status, code="redirect")
        return UpstreamError(
            f"The upstream model server answered with a redirect (status {status}), "
            "which is not followed."
        )
    raw = await _error_body(resp, deadline)
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError:
        obj = {}
    message = _clean(_error_message(obj))
    err = obj.get("error") if isinstance(obj, dict) else None
    code = err.get("code") if isinstance(err, dict) else None
    log.warning("upstream_error", status=status, code=code)
    if status == 429:
        retry = resp.headers.get("Retry-After", "1")
        return RateLimitError(
            "The upstream model server is rate limiting; retry shortly.",
            headers={"Retry-After": retry if retry.isdigit() else "1"},
        )
    if status in (400, 422) and (code == "context_length_exceeded" or "context" in message.lower()):
        return ContextLengthExceededError(message, param="messages")
    if status in (400, 422):
        return InvalidRequestError(message)
    if status in (401, 403):
        return UpstreamError("The upstream model server rejected our credentials.")
    return UpstreamError(f"The upstream model server failed (status {status}).")
