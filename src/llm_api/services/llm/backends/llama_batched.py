"""In-process llama.cpp with continuous batching: every request of a model shares one engine
thread that decodes all running sequences together (services/llm/engine/).

Same Backend protocol as the one-at-a-time `LlamaCppBackend`; `context_length` is the context of
one slot (what one request may use) and the KV cache holds `slots × context_length` tokens,
plus `reserved` more sequences: the slots the admission gate keeps for tenants below their fair
share (services/llm/admission.py), on top of `slots` so that a lone tenant still has them all.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from functools import cache
from typing import Any

import anyio
import llama_cpp
import structlog
from llama_cpp import _internals  # the model/context wrappers `Llama` itself is built on

from llm_api.core.cpus import available_cpus
from llm_api.core.exceptions import InvalidRequestError, ServiceUnavailableError
from llm_api.services.llm.backends import llama_log
from llm_api.services.llm.backends.base import warmup_request
from llm_api.services.llm.chat_template import (
    ChatTemplate,
    TemplateRenderError,
    template_from_metadata,
    tokenize_pieces,
)
from llm_api.services.llm.engine.engine import BatchEngine
from llm_api.services.llm.engine.sampling import check_grammar, request_seed
from llm_api.services.llm.engine.sequence import Sequence, Sink
from llm_api.services.llm.grammar import gbnf_for_schema
from llm_api.services.llm.registry import ModelConfig
from llm_api.services.llm.tools.grammar import CallTrigger, call_grammar
from llm_api.services.llm.tools.local import (
    ToolPlan,
    grammar_piece,
    plan_tools,
    render_prompt,
    uses_tools,
    with_tools,
)
from llm_api.services.llm.types import Frame, GenerationRequest

log = structlog.get_logger(__name__)


class LlamaBatchedBackend:
    def __init__(
        self, config: ModelConfig, *, threads: int | None = None, reserved: int = 0
    ) -> None:
        self.config = config
        self._threads = threads or available_cpus()
        self._sequences = config.slots + reserved  # what the engine and its KV cache hold
        self._model: Any = None
        self._ctx: Any = None
        self._engine: BatchEngine | None = None
        self._template: ChatTemplate | None = None
        self._ready = False

    @property
    def ready(self) -> bool:
        return self._ready and self._engine is not None and self._engine.alive

    @property
    def engine(self) -> BatchEngine | None:
        return self._engine

    # --- lifecycle ------------------------------------------------------------------------------

    async def start(self, warmup: bool = True) -> None:
        await asyncio.to_thread(self._load)
        if warmup:
            await self.warmup()
        self._ready = True

    def _context_params(self) -> Any:
        """The same context settings `Llama(...)` uses in the one-at-a-time backend (so one
        sequence alone decodes to the same tokens), plus the multi-sequence KV layout."""
        cfg = self.config
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = self._sequences * cfg.context_length
        params.n_batch = cfg.n_batch
        params.n_ubatch = cfg.n_batch  # one micro-batch per prompt chunk: see exact_reuse
        params.n_seq_max = self._sequences
        params.kv_unified = False  # one KV stream per sequence: attention spans only its own
        params.n_threads = self._threads
        params.n_threads_batch = self._threads
        params.flash_attn_type = (
            llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED
            if cfg.flash_attn
            else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
        )
        return params

    def _load(self) -> None:
        llama_cpp.llama_backend_init()
        llama_log.install()
        path = self.config.gguf_path()
        self._model = _internals.LlamaModel(
            path_model=str(path), params=llama_cpp.llama_model_default_params(), verbose=False
        )
        self._ctx = _internals.LlamaContext(
            model=self._model, params=self._context_params(), verbose=False
        )
        self._configure_context()
        model = self._model
        self._grammar_piece = grammar_piece(model.vocab)
        bos, eos = model.token_bos(), model.token_eos()
        self._template = ChatTemplate(
            template_from_metadata(model.metadata()),
            bos_token=self._piece(bos, special=True),
            eos_token=self._piece(eos, special=True),
        )

        @cache  # the vocabulary is finite and fixed: memoise token → bytes
        def detokenize(token: int) -> bytes:
            return bytes(model.detokenize([token], special=False))

        self._engine = BatchEngine(
            name=self.config.id,
            ctx=self._ctx.ctx,
            vocab=model.vocab,
            n_vocab=model.n_vocab(),
            slots=self._sequences,
            ctx_per_slot=self.config.context_length,
            n_batch=self.config.n_batch,
            defaults=self.config.defaults,
            detokenize=detokenize,
            prefix_cache=self.config.prefix_cache,
        )
        self._engine.start()
        log.info(
            "model_loaded",
            model=self.config.id,
            path=path.name,
            engine="batched",
            slots=self._sequences,
            ctx_per_slot=self.config.context_length,
        )

    def _configure_context(self) -> None:
        """Before the engine starts: a subclass may change the context (fine-tuned models
        apply their LoRA adapter here, services/fine_tuning/serving.py)."""

    def _piece(self, token: int, *, special: bool) -> str:
        if token < 0:
            return ""
        return bytes(self._model.detokenize([token], special=special)).decode("utf-8", "replace")

    async def warmup(self) -> None:
        req = warmup_request(self.config.id)
        await self.prepare(req)
        async for _ in self._generate(req):
            pass

    async def aclose(self) -> None:
        self._ready = False
        if self._engine is not None:
            await asyncio.to_thread(self._engine.stop)
            self._engine = None
        if self._ctx is not None:
            self._ctx.close()
            self._ctx = None
        if self._model is not None:
            self._model.close()
            self._model = None

    # --- requests -------------------------------------------------------------------------------

    def tokenize_request(self, request: GenerationRequest) -> list[int]:
        model, template = self._model, self._template
        assert model is not None and template is not None
        add_bos = bool(model.add_bos_token())
        if request.messages is not None:
            try:
                pieces = (
                    render_prompt(template, request)
                    if uses_tools(request)
                    else template.render_pieces(request.messages)
                )
            except TemplateRenderError as exc:
                raise InvalidRequestError(str(exc), param="messages") from None
            return tokenize_pieces(
                pieces, model.tokenize, add_bos=add_bos, bos_id=model.token_bos()
            )
        # Legacy completions: the prompt is raw text; special tokens stay plain text here too.
        return list(model.tokenize((request.prompt or "").encode("utf-8"), add_bos, False))

    async def prepare(self, request: GenerationRequest) -> None:
        tokens = await asyncio.to_thread(self.tokenize_request, request)
        if not tokens:
            raise InvalidRequestError("The prompt is empty.", param="prompt")
        request.prompt_tokens = len(tokens)
        request.engine_state["tokens"] = tokens
        if request.params.json_schema is not None:
            # Compile (and let llama.cpp parse) now, so a bad schema is a 400 before queueing.
            gbnf = await asyncio.to_thread(gbnf_for_schema, request.params.json_schema)
            await asyncio.to_thread(check_grammar, self._model.vocab, gbnf)
            request.engine_state["gbnf"] = gbnf
        plan = await asyncio.to_thread(plan_tools, request)
        if plan is not None:
            # Let llama.cpp parse the call grammar now: a 400 here, not a failure mid-stream.
            await asyncio.to_thread(check_grammar, self._model.vocab, call_grammar(plan.rules))
            request.engine_state["tools"] = plan
            if plan.gbnf is not None:
                request.engine_state["gbnf"] = plan.gbnf

    def generate(self, request: GenerationRequest) -> AsyncGenerator[Frame, None]:
        if not self.ready:
            raise ServiceUnavailableError(f"Model `{self.config.id}` is loading; retry shortly.")
        return with_tools(request, self._generate, self.prepare)

    async def _generate(self, request: GenerationRequest) -> AsyncGenerator[Frame, None]:
        if "tokens" not in request.engine_state:
            await self.prepare(request)
        engine = self._engine
        assert engine is not None
        state = request.engine_state
        sink = Sink(asyncio.get_running_loop())
        plan: ToolPlan | None = state.get("tools")
        seq = Sequence(
            prompt=state["tokens"],
            params=request.params,
            gbnf=state.get("gbnf"),
            seed=request_seed(request.params),
            sink=sink,
            rank=request.prefill_rank,
            standing=request.prefill_standing,
            trigger=(
                CallTrigger(plan.rules, self._grammar_piece)
                if plan is not None and plan.gbnf is None
                else None
            ),
        )
        engine.submit(seq)
        try:
            while True:
                item = await sink.queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finish_reason is not None:
                    break
        finally:
            engine.cancel(seq)  # no-op once finished; otherwise frees the slot next step
            # Wait (shielded from the cancellation that may have brought us here) until the
            # engine has freed the slot, so the admission gate never over-commits slots.
            with anyio.CancelScope(shield=True):
                await asyncio.shield(sink.released)
