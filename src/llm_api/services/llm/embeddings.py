"""The embeddings service: `/v1/embeddings` requests (and batch lines) → vectors.

It shares the LLM service's registry, backends and admission gates, and the completion
pipeline's admission stage (rate limits) and accounting (its subscribers), so everything that
applies to completions applies here: tier gating, request and token limits (tokens = input
tokens), one usage record and the metrics per request, fallbacks. On top:

- a per-input cache: embeddings are deterministic, so each input's vector is cached on its own
  (model version, tenant, input) and a request whose inputs are partly cached computes only the
  rest, in one call;
- local models (in-process llama.cpp) get token ids: strings are tokenized here, every input is
  checked against the model's context (400 naming `input`) before any work is queued;
- upstream models (one upstream or a `router` of deployments) are called in parts of at most
  `embedding_upstream_batch` inputs, each routed, retried and breaker-checked like a completion.

`dimensions` is honoured only for models declared `matryoshka` (trained so that a prefix of the
vector is itself an embedding): the prefix is re-normalised. Any other model answers 400, as
OpenAI's models without the feature do.
"""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import orjson
import structlog

from llm_api.core import metrics
from llm_api.core.config import Settings
from llm_api.core.exceptions import (
    ContextLengthExceededError,
    InvalidRequestError,
    ServiceUnavailableError,
)
from llm_api.schemas.embeddings import MAX_EMBEDDING_INPUTS, EmbeddingRequest
from llm_api.services.cache.keys import cache_key, model_version
from llm_api.services.cache.service import CachePolicy
from llm_api.services.cache.store import CacheStore
from llm_api.services.llm.priority import Tickets
from llm_api.services.llm.registry import ModelConfig
from llm_api.services.llm.service import LLMService
from llm_api.services.llm.stages import AdmissionStage, Outcome, ended, first_success
from llm_api.services.llm.types import CompletionRecord, RequestContext
from llm_api.services.money.prices import usd

log = structlog.get_logger(__name__)

Item = str | list[int]  # one input: text, or token ids
# Inputs tokenized off the event loop past this many characters in all (a long batch would
# otherwise stall every other request for milliseconds).
_TOKENIZE_INLINE_CHARS = 4096


class LocalEmbedder(Protocol):
    """What a local embedding backend (backends/llama_embedding.py) offers the service."""

    @property
    def ready(self) -> bool: ...

    @property
    def context_length(self) -> int: ...

    @property
    def dimensions(self) -> int: ...

    def tokenize(self, text: str) -> list[int]: ...

    async def embed(self, inputs: list[list[int]]) -> list[list[float]]: ...


class UpstreamEmbedder(Protocol):
    async def embed(self, inputs: list[str] | list[list[int]]) -> Any: ...


@dataclass(slots=True)
class EmbeddingResult:
    model: str  # the model that answered (after any fallback)
    vectors: list[np.ndarray]  # float32, in input order, shortened when asked
    prompt_tokens: int
    outcome: Outcome  # for the route: x-cache, x-ratelimit-*, the access log

    def body(self, encoding_format: str) -> bytes:
        """The OpenAI response JSON. Floats are written by orjson straight from the float32
        arrays (shortest round-trip form); base64 is the little-endian float32 bytes, as
        OpenAI sends and the openai SDK decodes."""
        if encoding_format == "base64":
            data: list[dict[str, Any]] = [
                {
                    "object": "embedding",
                    "index": i,
                    "embedding": base64.b64encode(v.astype("<f4").tobytes()).decode("ascii"),
                }
                for i, v in enumerate(self.vectors)
            ]
        else:
            data = [
                {"object": "embedding", "index": i, "embedding": v}
                for i, v in enumerate(self.vectors)
            ]
        usage = {
            "prompt_tokens": self.prompt_tokens,
            "total_tokens": self.prompt_tokens,
            "cost": usd(self.outcome.cost_nanos),
        }
        return orjson.dumps(
            {"object": "list", "data": data, "model": self.model, "usage": usage},
            option=orjson.OPT_SERIALIZE_NUMPY,
        )


@dataclass(slots=True)
class _Computed:
    vectors: list[np.ndarray]
    tokens: list[int]  # per input


@dataclass(slots=True)
class _Run:
    ctx: RequestContext
    model: ModelConfig
    started: float = field(default_factory=time.perf_counter)
    admitted: float | None = None
    prompt_tokens: int = 0
    hits: int = 0
    computed_tokens: int = 0  # of prompt_tokens, those a model computed (cached inputs are free)


class EmbeddingService:
    def __init__(
        self,
        llm: LLMService,
        store: CacheStore | None,
        settings: Settings,
        admission: AdmissionStage,
    ) -> None:
        self.llm = llm
        self.admission = admission  # the completion pipeline's: rate limits and accounting
        self.store = store  # shared with the response cache, which closes it
        self.shared = settings.cache_shared
        self.max_chars = settings.max_message_chars
        self.upstream_batch = settings.embedding_upstream_batch
        self.tickets = Tickets.from_settings(settings)  # the gates' fair queuing
        self._versions: dict[str, str] = {}

    # --- validation -----------------------------------------------------------------------------

    def model_for(self, model_id: str, ctx: RequestContext) -> ModelConfig:
        """The embedding model, if the caller's tier may use it."""
        config = self.llm.get_model_for(model_id, ctx)
        if config.kind != "embedding":
            raise InvalidRequestError(
                f"The model `{model_id}` is not an embedding model; use it with "
                "/v1/chat/completions or /v1/completions.",
                param="model",
            )
        return config

    def inputs(self, req: EmbeddingRequest) -> list[Item]:
        """The request's inputs as a list: a string or one token-id array is one input."""
        raw = req.input
        if isinstance(raw, str):
            items: list[Item] = [raw]
        elif raw and all(isinstance(x, int) for x in raw):
            items = [list(raw)]  # type: ignore[arg-type]
        else:
            items = list(raw)  # type: ignore[arg-type]
        if not items:
            raise InvalidRequestError("`input` must not be an empty array.", param="input")
        if len(items) > MAX_EMBEDDING_INPUTS:
            raise InvalidRequestError(
                f"`input` has {len(items)} items; at most {MAX_EMBEDDING_INPUTS} are allowed "
                "per request.",
                param="input",
            )
        for i, item in enumerate(items):
            where = "input" if isinstance(raw, str) or len(items) == 1 else f"input[{i}]"
            if not item:
                kind = "string" if isinstance(item, str) else "token array"
                raise InvalidRequestError(f"`{where}` is an empty {kind}.", param="input")
            if isinstance(item, str) and len(item) > self.max_chars:
                raise InvalidRequestError(
                    f"`{where}` is longer than {self.max_chars} characters.", param="input"
                )
        return items

    @staticmethod
    def _check_dimensions(config: ModelConfig, dimensions: int, native: int | None) -> None:
        """`dimensions` only for a model that can shorten (`matryoshka`), and at most its own
        size (`native`, once known)."""
        if not config.matryoshka:
            raise InvalidRequestError(
                f"The model `{config.id}` does not support `dimensions`: its vectors cannot be "
                "shortened without losing quality.",
                param="dimensions",
            )
        if native is not None and dimensions > native:
            raise InvalidRequestError(
                f"`dimensions` must be at most {native} for the model `{config.id}`.",
                param="dimensions",
            )

    def _native(self, config: ModelConfig) -> int | None:
        """A local model's vector size, known before any work; upstreams' only from answers."""
        backend = self.llm.backends.get(config.id)
        if config.backend == "llama_cpp" and backend is not None and backend.ready:
            return int(backend.dimensions)  # type: ignore[attr-defined]
        return None

    # --- the request ----------------------------------------------------------------------------

    async def embed(
        self, req: EmbeddingRequest, ctx: RequestContext, policy: CachePolicy | None = None
    ) -> EmbeddingResult:
        policy = policy or CachePolicy()
        config = self.model_for(req.model, ctx)
        items = self.inputs(req)
        if req.dimensions is not None:
            self._check_dimensions(config, req.dimensions, self._native(config))
        candidates = self.llm.candidates(config, ctx)
        run = _Run(ctx=ctx, model=config)
        out = Outcome(model=config.id, started=run.started)
        # Rate limits: a refusal is a 429 before any work.
        tokens = _reservation(items, candidates)
        await self.admission.check(ctx, tokens, out, _reserved_cost(items, candidates))
        status, cancelled = 200, False
        try:

            async def attempt(model: ModelConfig) -> list[np.ndarray]:
                run.model = model
                return await self._attempt(model, items, policy, run)

            vectors = await first_success(candidates, attempt)  # the completions' fallbacks
            if req.dimensions is not None:
                self._check_dimensions(run.model, req.dimensions, native=len(vectors[0]))
                vectors = [_shorten(v, req.dimensions) for v in vectors]
            out.cache = "hit" if run.hits == len(items) else "partial" if run.hits else "miss"
            return EmbeddingResult(run.model.id, vectors, run.prompt_tokens, out)
        except BaseException as exc:
            status, cancelled = ended(exc, self.llm.drain_cut, out.headers)
            raise
        finally:
            out.model, out.prompt_tokens = run.model.id, run.prompt_tokens
            failed = status >= 500
            out.cost_nanos = 0 if failed else run.model.pricing.cost(run.computed_tokens, 0, 0)
            await self._notify(run, status, cancelled, len(items), out.cost_nanos)

    async def _attempt(
        self, config: ModelConfig, items: list[Item], policy: CachePolicy, run: _Run
    ) -> list[np.ndarray]:
        """One model: the cached inputs from the store, the rest computed in one call (under
        the model's admission gate), then stored."""
        run.hits = run.prompt_tokens = run.computed_tokens = 0
        run.admitted = None
        keys = self._keys(config, items, run.ctx) if self.store is not None else None
        vectors: list[np.ndarray | None] = [None] * len(items)
        tokens = [0] * len(items)
        if keys is not None and policy.read and self.store is not None:
            for i, raw in enumerate(await self.store.get_many(keys)):
                entry = _decode_entry(raw)
                if entry is not None:
                    vectors[i], tokens[i] = entry
            run.hits = sum(v is not None for v in vectors)
            metrics.CACHE_HITS.labels(cache="embedding").inc(run.hits)
            metrics.CACHE_MISSES.labels(cache="embedding").inc(len(items) - run.hits)
        missing = [i for i, v in enumerate(vectors) if v is None]
        if missing:
            backend = self.llm.backends[config.id]
            if not backend.ready:
                raise ServiceUnavailableError(f"Model `{config.id}` is loading; retry shortly.")
            texts = [items[i] for i in missing]
            cost = sum(len(t) // 3 + 1 if isinstance(t, str) else len(t) for t in texts)
            ticket = self.tickets.ticket(run.ctx, [], cost=cost)
            async with self.llm.gates[config.id].slot(ticket):
                run.admitted = time.perf_counter()
                computed = await self._compute(config, backend, texts)
            for j, i in enumerate(missing):
                vectors[i], tokens[i] = computed.vectors[j], computed.tokens[j]
            run.computed_tokens = sum(computed.tokens)
            if keys is not None and policy.write and self.store is not None:
                await self.store.set_many(
                    [(keys[i], _encode_entry(computed.vectors[j], computed.tokens[j]))
                     for j, i in enumerate(missing)]
                )  # fmt: skip
        metrics.EMBEDDING_INPUTS.labels(config.id).inc(len(items))
        run.prompt_tokens = sum(tokens)
        return [v for v in vectors if v is not None]

    async def _compute(self, config: ModelConfig, backend: Any, items: list[Item]) -> _Computed:
        if config.backend == "llama_cpp":
            return await self._local(config, backend, items)
        if config.backend == "router":
            parts = [
                backend.call(lambda dep, part=part: self._on_deployment(config, dep, part))
                for part in _parts(items, self.upstream_batch)
            ]
        else:
            parts = [self._upstream(backend, part) for part in _parts(items, self.upstream_batch)]
        done = await _all_or_nothing(parts)
        return _Computed([v for c in done for v in c.vectors], [t for c in done for t in c.tokens])

    async def _on_deployment(self, config: ModelConfig, dep: Any, items: list[Item]) -> _Computed:
        """One routed part on the deployment the router picked."""
        if dep.local:
            return await self._local(dep.backend.config, dep.backend, items)
        return await self._upstream(dep.backend, items)

    async def _local(
        self, config: ModelConfig, backend: LocalEmbedder, items: list[Item]
    ) -> _Computed:
        ids = await _tokenize(backend, items)
        limit = backend.context_length
        for i, seq in enumerate(ids):
            if len(seq) > limit:
                where = "input" if len(items) == 1 else f"input[{i}]"
                raise ContextLengthExceededError(
                    f"This model's maximum context length is {limit} tokens, however `{where}` "
                    f"has {len(seq)} tokens. Please shorten it.",
                    param="input",
                )
        vectors = await backend.embed(ids)
        return _Computed([np.asarray(v, dtype=np.float32) for v in vectors], [len(s) for s in ids])

    @staticmethod
    async def _upstream(backend: UpstreamEmbedder, items: list[Item]) -> _Computed:
        answer = await backend.embed(items)  # type: ignore[arg-type]
        vectors = [np.asarray(v, dtype=np.float32) for v in answer.vectors]
        return _Computed(vectors, _split_tokens(items, answer.prompt_tokens))

    # --- cache ----------------------------------------------------------------------------------

    def _keys(self, config: ModelConfig, items: list[Item], ctx: RequestContext) -> list[str]:
        """One key per input: the model and its version (weights, registry entry), the tenant
        (unless the cache is shared) and the input itself."""
        if config.id not in self._versions:
            self._versions[config.id] = model_version(config)
        version = self._versions[config.id]
        tenant = "*" if self.shared else f"user:{ctx.user_id}"
        return [
            cache_key(
                endpoint="embeddings",
                model=config.id,
                version=version,
                tenant=tenant,
                body={"input": item},
            )
            for item in items
        ]

    # --- accounting -----------------------------------------------------------------------------

    async def _notify(
        self, run: _Run, status: int, cancelled: bool, count: int, cost_nanos: int
    ) -> None:
        now = time.perf_counter()
        record = CompletionRecord(
            request_id=run.ctx.request_id,
            model=run.model.id,
            endpoint="embeddings",
            user_id=run.ctx.user_id,
            key_id=run.ctx.key_id,
            batch_id=run.ctx.batch_id,
            prompt_tokens=run.prompt_tokens,
            completion_tokens=0,
            finish_reason="stop" if status == 200 else None,
            status=status,
            cache_hit=status == 200 and run.hits == count,
            cancelled=cancelled,
            ttft_ms=None,
            latency_ms=(now - run.started) * 1000,
            queue_ms=((run.admitted or now) - run.started) * 1000,
            stream=False,
            cost_nanos=cost_nanos,
            team_id=run.ctx.team_id,
        )
        await self.admission.accounting.record(record)


async def _tokenize(backend: LocalEmbedder, items: list[Item]) -> list[list[int]]:
    def work() -> list[list[int]]:
        return [backend.tokenize(x) if isinstance(x, str) else x for x in items]

    chars = sum(len(x) for x in items if isinstance(x, str))
    return work() if chars <= _TOKENIZE_INLINE_CHARS else await asyncio.to_thread(work)


async def _all_or_nothing(parts: list[Coroutine[Any, Any, _Computed]]) -> list[_Computed]:
    """Every part, or the first failure with the other parts cancelled: the request has failed
    (or falls back), so nothing should go on calling upstreams for it. (A TaskGroup would wrap
    the failure in an ExceptionGroup, which no error handler matches.)"""
    if len(parts) == 1:
        return [await parts[0]]
    tasks = [asyncio.ensure_future(p) for p in parts]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


def _parts(items: list[Item], size: int) -> list[list[Item]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def _estimate(item: Item) -> int:
    """Tokens an input may be, before tokenizing: 1 per 3 characters (as the completions'
    reservation), or the ids' count."""
    return len(item) // 3 + 1 if isinstance(item, str) else len(item)


def _reservation(items: Sequence[Item], candidates: list[ModelConfig]) -> int:
    """Input tokens to reserve against the caller's token limits, settled to the real count."""
    local = all(c.backend == "llama_cpp" for c in candidates)
    cap = max(c.context_length for c in candidates) if local else None
    return sum(min(_estimate(x), cap) if cap else _estimate(x) for x in items)


def _reserved_cost(items: Sequence[Item], candidates: list[ModelConfig]) -> int:
    """The most the inputs may cost (nano-dollars): a byte-level tokenizer makes at most one
    token per UTF-8 byte (token-id inputs are counted as they are), plus room for the special
    tokens, at the dearest candidate's input price."""
    price = max(c.pricing.per_token()[0] for c in candidates)
    if not price:
        return 0
    bound = sum((len(x.encode()) if isinstance(x, str) else len(x)) + 8 for x in items)
    return bound * price


def _split_tokens(items: list[Item], total: int | None) -> list[int]:
    """Per-input token counts from an upstream's per-request total (for the per-input cache's
    usage), shared out by estimated size; without a total, the estimates."""
    estimates = [_estimate(x) for x in items]
    if total is None:
        return estimates
    whole = sum(estimates)
    shares = [total * e // whole for e in estimates]
    shares[-1] += total - sum(shares)
    return shares


def _shorten(vector: np.ndarray, dimensions: int) -> np.ndarray:
    """A Matryoshka prefix, re-normalised to unit length."""
    head = vector[:dimensions]
    norm = float(np.linalg.norm(head))
    return head / norm if norm > 0 else head


def _encode_entry(vector: np.ndarray, tokens: int) -> bytes:
    data = base64.b64encode(vector.astype("<f4").tobytes()).decode("ascii")
    return orjson.dumps({"t": tokens, "v": data})


def _decode_entry(raw: bytes | None) -> tuple[np.ndarray, int] | None:
    if raw is None:
        return None
    try:
        obj = orjson.loads(raw)
        vector = np.frombuffer(base64.b64decode(obj["v"], validate=True), dtype="<f4")
        tokens = obj["t"]
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
        return None
    if not isinstance(tokens, int) or tokens < 0 or not vector.size:
        return None
    return vector.astype(np.float32), tokens
