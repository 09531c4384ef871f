"""The OpenAI completion endpoints' serving logic: validate a request once into engine
requests (the family's protocol, through LLMService), run it through the pipeline, and hand back
its frames (a stream) or the whole `shaping.Answer`; api/v1/{chat,completions,responses}/serving.py
encode either in the family's wire shape.

Every method returns the response and the pipeline's `Outcome` (answering model, tokens, cache
status, rate-limit headers), which the route turns into headers and hands to the access log.
`policy=None` runs without the response cache (the simple API, batch lines).
"""

from __future__ import annotations

from collections.abc import AsyncGenerator

from llm_api.core.exceptions import InvalidRequestError, ServiceUnavailableError
from llm_api.schemas.chat import ChatCompletionRequest
from llm_api.schemas.completions import CompletionRequest
from llm_api.services.cache.service import CachePolicy
from llm_api.services.llm import shaping
from llm_api.services.llm.pipeline import Pipeline
from llm_api.services.llm.service import LLMService
from llm_api.services.llm.stages import Call, Outcome
from llm_api.services.llm.types import Frame, RequestContext

# A started answer's frames (each with its choice `index`); api/v1/*/serving.py encode them.
Frames = AsyncGenerator[Frame, None]


class CompletionServing:
    def __init__(self, llm: LLMService, pipeline: Pipeline) -> None:
        self.llm = llm
        self.pipeline = pipeline

    def plan(
        self,
        req: ChatCompletionRequest | CompletionRequest,
        ctx: RequestContext,
        policy: CachePolicy | None,
        *,
        stream: bool,
        endpoint: str | None = None,
    ) -> Call:
        """Validate once (a 4xx before any cache lookup) into the pipeline's call. `endpoint`
        names a family served through another's protocol (responses and messages, through
        chat) in the records, metrics and cache keys."""
        if isinstance(req, ChatCompletionRequest):
            family, (config, seqs) = "chat", self.llm.chat_requests(req, ctx)
        else:
            family, (config, seqs) = "completions", self.llm.completion_requests(req, ctx)
        endpoint = endpoint or family
        return Call(
            ctx=ctx,
            endpoint=endpoint,
            model=config,
            candidates=self.llm.candidates(config, ctx),
            seqs=seqs,
            stream=stream,
            n=req.n,
            body=req if policy is not None else None,
            cache_read=policy is not None and policy.read,
            cache_write=policy is not None and policy.write,
        )

    def fingerprint(self, model: str) -> str | None:
        """The answering model's `system_fingerprint` (local models; None: leave it out)."""
        return self.llm.fingerprints.get(model)

    # chat and completions, streamed or whole: one path each, the family only picks the protocol.

    async def _stream(
        self,
        req: ChatCompletionRequest | CompletionRequest,
        ctx: RequestContext,
        policy: CachePolicy | None,
        endpoint: str | None = None,
    ) -> tuple[Frames, Outcome]:
        await self.llm.resolve(req.model, ctx)
        return await self.pipeline.run(self.plan(req, ctx, policy, stream=True, endpoint=endpoint))

    async def _answer(
        self,
        req: ChatCompletionRequest | CompletionRequest,
        ctx: RequestContext,
        policy: CachePolicy | None,
        endpoint: str | None = None,
    ) -> tuple[shaping.Answer, Outcome]:
        await self.llm.resolve(req.model, ctx)
        call = self.plan(req, ctx, policy, stream=False, endpoint=endpoint)
        frames, out = await self.pipeline.run(call)
        answer = await shaping.collect(frames, len(call.seqs), req.n)
        answer.model = out.model  # the model that answered, after any fallback
        answer.cost_nanos = out.cost_nanos
        return answer, out

    async def chat_stream(
        self,
        req: ChatCompletionRequest,
        ctx: RequestContext,
        policy: CachePolicy | None = None,
        endpoint: str | None = None,
    ) -> tuple[Frames, Outcome]:
        return await self._stream(req, ctx, policy, endpoint)

    async def chat(
        self,
        req: ChatCompletionRequest,
        ctx: RequestContext,
        policy: CachePolicy | None = None,
        endpoint: str | None = None,
    ) -> tuple[shaping.Answer, Outcome]:
        return await self._answer(req, ctx, policy, endpoint)

    async def prompt_tokens(self, req: ChatCompletionRequest, ctx: RequestContext) -> int:
        """The prompt's tokens as the model would see them (its chat template and tokenizer,
        tools included): local models only; 400 for a model that cannot count here."""
        await self.llm.resolve(req.model, ctx)
        config, seqs = self.llm.chat_requests(req, ctx)
        backend = self.llm.backends[config.id]
        if not backend.ready:
            raise ServiceUnavailableError(f"The model `{config.id}` is loading.")
        await backend.prepare(seqs[0])
        if seqs[0].prompt_tokens is None:
            raise InvalidRequestError(
                f"Counting tokens needs a local model; `{config.id}` is served upstream.",
                param="model",
            )
        return seqs[0].prompt_tokens

    async def completion_stream(
        self, req: CompletionRequest, ctx: RequestContext, policy: CachePolicy | None = None
    ) -> tuple[Frames, Outcome]:
        return await self._stream(req, ctx, policy)

    async def completion(
        self, req: CompletionRequest, ctx: RequestContext, policy: CachePolicy | None = None
    ) -> tuple[shaping.Answer, Outcome]:
        return await self._answer(req, ctx, policy)

    # /v1/responses: translated into a chat request (api/v1/responses/protocol.py), served as one.

    async def responses_stream(
        self, req: ChatCompletionRequest, ctx: RequestContext, policy: CachePolicy | None = None
    ) -> tuple[Frames, Outcome]:
        return await self._stream(req, ctx, policy, "responses")

    async def responses(
        self, req: ChatCompletionRequest, ctx: RequestContext, policy: CachePolicy | None = None
    ) -> tuple[shaping.Answer, Outcome]:
        return await self._answer(req, ctx, policy, "responses")
