"""The OpenAI completion endpoints' serving logic: validate a request once into engine
requests, run it through the pipeline, and shape its frames as chunks or a whole response.

Every method returns the response and the pipeline's `Outcome` (answering model, tokens, cache
status, rate-limit headers), which the route turns into headers and hands to the access log.
`policy=None` runs without the response cache (the simple API, batch lines).
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from llm_api.schemas.chat import ChatCompletion, ChatCompletionChunk, ChatCompletionRequest
from llm_api.schemas.completions import Completion, CompletionRequest
from llm_api.services.cache.service import CachePolicy
from llm_api.services.llm import shaping
from llm_api.services.llm.pipeline import Pipeline
from llm_api.services.llm.service import LLMService
from llm_api.services.llm.stages import Call, Outcome
from llm_api.services.llm.types import RequestContext

ChatChunks = AsyncIterator[ChatCompletionChunk | shaping.TextFrame]
CompletionChunks = AsyncIterator[Completion | shaping.TextFrame]


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
    ) -> Call:
        """Validate once (a 4xx before any cache lookup) into the pipeline's call."""
        if isinstance(req, ChatCompletionRequest):
            endpoint, (config, seqs) = "chat", self.llm.chat_requests(req, ctx)
        else:
            endpoint, (config, seqs) = "completions", self.llm.completion_requests(req, ctx)
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

    async def chat_stream(
        self, req: ChatCompletionRequest, ctx: RequestContext, policy: CachePolicy | None = None
    ) -> tuple[ChatChunks, Outcome]:
        call = self.plan(req, ctx, policy, stream=True)
        frames, out = await self.pipeline.run(call)
        # The model that answered (after any fallback) names the response.
        return shaping.chat_chunks(req, ctx, out.model, frames), out

    async def chat(
        self, req: ChatCompletionRequest, ctx: RequestContext, policy: CachePolicy | None = None
    ) -> tuple[ChatCompletion, Outcome]:
        call = self.plan(req, ctx, policy, stream=False)
        frames, out = await self.pipeline.run(call)
        texts, finish, usage = await shaping.collect(frames, len(call.seqs), req.n)
        return shaping.chat_response(ctx, out.model, texts, finish, usage), out

    async def completion_stream(
        self, req: CompletionRequest, ctx: RequestContext, policy: CachePolicy | None = None
    ) -> tuple[CompletionChunks, Outcome]:
        call = self.plan(req, ctx, policy, stream=True)
        frames, out = await self.pipeline.run(call)
        return shaping.completion_chunks(req, ctx, out.model, frames), out

    async def completion(
        self, req: CompletionRequest, ctx: RequestContext, policy: CachePolicy | None = None
    ) -> tuple[Completion, Outcome]:
        call = self.plan(req, ctx, policy, stream=False)
        frames, out = await self.pipeline.run(call)
        texts, finish, usage = await shaping.collect(frames, len(call.seqs), req.n)
        return shaping.completion_response(ctx, out.model, texts, finish, usage), out
