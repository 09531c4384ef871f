"""In-process inference on a GGUF file with llama-cpp-python, one sequence at a time.

Generation runs on one dedicated thread per model (llama.cpp releases the GIL while it computes),
so the event loop never blocks. Tokens travel to the request's coroutine through an asyncio
queue. Closing the request's iterator sets a cancel flag that the thread checks after every
token, so a disconnected client frees the model within a token.
"""

from __future__ import annotations

import asyncio
import secrets
import threading
from collections.abc import AsyncGenerator, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import anyio
import structlog

from llm_api.core.cpus import available_cpus
from llm_api.core.exceptions import InvalidRequestError
from llm_api.services.llm.backends.base import warmup_request
from llm_api.services.llm.chat_template import (
    ChatTemplate,
    TemplateRenderError,
    template_from_metadata,
    tokenize_pieces,
)
from llm_api.services.llm.engine.logprobs import LogprobReader
from llm_api.services.llm.grammar import build_grammar, gbnf_for_schema
from llm_api.services.llm.registry import ModelConfig
from llm_api.services.llm.text_stream import TextAssembler
from llm_api.services.llm.tools.grammar import CallTrigger, call_grammar
from llm_api.services.llm.tools.local import (
    ToolPlan,
    grammar_piece,
    plan_tools,
    render_prompt,
    uses_tools,
    with_tools,
)
from llm_api.services.llm.types import Frame, GenerationRequest, TokenLogprob

log = structlog.get_logger(__name__)

_DONE = object()


class LlamaCppBackend:
    def __init__(self, config: ModelConfig, *, threads: int | None = None) -> None:
        self.config = config
        self._threads = threads or available_cpus()
        # One thread: llama.cpp contexts are not thread-safe, and it serialises generations.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"llama-{config.id}")
        self._llama: Any = None
        self._template: ChatTemplate | None = None
        self._logprobs: LogprobReader | None = None
        self._ready = False

    @property
    def ready(self) -> bool:
        return self._ready

    # --- lifecycle ------------------------------------------------------------------------------

    async def start(self, warmup: bool = True) -> None:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, self._load)
        if warmup:
            await self.warmup()
        self._ready = True

    def _load(self) -> None:
        from llama_cpp import Llama

        path = self.config.gguf_path()
        self._llama = Llama(
            model_path=str(path),
            n_ctx=self.config.context_length,
            n_batch=self.config.n_batch,
            n_ubatch=self.config.n_batch,  # as the batched engine (see engine/exact_reuse.py)
            n_threads=self._threads,
            n_threads_batch=self._threads,
            flash_attn=self.config.flash_attn,
            verbose=False,
        )
        meta = self._llama.metadata
        self._grammar_piece = grammar_piece(self._llama._model.vocab)
        bos = self._piece(self._llama.token_bos())
        eos = self._piece(self._llama.token_eos())
        self._template = ChatTemplate(template_from_metadata(meta), bos_token=bos, eos_token=eos)
        model = self._llama._model
        self._logprobs = LogprobReader(
            self._llama.n_vocab(), lambda t: bytes(model.detokenize([t], special=False))
        )
        log.info(
            "model_loaded", model=self.config.id, path=path.name, n_ctx=self.config.context_length
        )

    def _piece(self, token: int) -> str:
        if token < 0:
            return ""
        return bytes(self._llama.detokenize([token], special=True)).decode("utf-8", "replace")

    async def warmup(self) -> None:
        req = warmup_request(self.config.id)
        self._ready = True  # generate() below needs it; reset on failure
        try:
            await self.prepare(req)
            async for _ in self.generate(req):
                pass
        except BaseException:
            self._ready = False
            raise

    async def aclose(self) -> None:
        self._ready = False
        self._executor.shutdown(wait=True, cancel_futures=True)
        if self._llama is not None:
            self._llama.close()
            self._llama = None

    # --- requests -------------------------------------------------------------------------------

    def tokenize_request(self, request: GenerationRequest) -> list[int]:
        llama, template = self._llama, self._template
        assert llama is not None and template is not None
        add_bos = bool(llama._model.add_bos_token())
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
                pieces, llama.tokenize, add_bos=add_bos, bos_id=llama.token_bos()
            )
        # Legacy completions: the prompt is raw text; special tokens stay plain text here too.
        return llama.tokenize((request.prompt or "").encode("utf-8"), add_bos, False)  # type: ignore[no-any-return]

    async def prepare(self, request: GenerationRequest) -> None:
        tokens = await asyncio.to_thread(self.tokenize_request, request)
        if not tokens:
            raise InvalidRequestError("The prompt is empty.", param="prompt")
        request.prompt_tokens = len(tokens)
        request.engine_state["tokens"] = tokens
        if request.params.json_schema is not None:
            # Compile now so a bad schema is a 400 before the request queues.
            gbnf = await asyncio.to_thread(gbnf_for_schema, request.params.json_schema)
            build_grammar(gbnf)
            request.engine_state["gbnf"] = gbnf
        plan = await asyncio.to_thread(plan_tools, request)
        if plan is not None:
            build_grammar(call_grammar(plan.rules))  # a 400 here, not a failure mid-stream
            request.engine_state["tools"] = plan
            if plan.gbnf is not None:
                request.engine_state["gbnf"] = plan.gbnf

    def generate(self, request: GenerationRequest) -> AsyncGenerator[Frame, None]:
        return with_tools(request, self._generate, self.prepare)

    async def _generate(self, request: GenerationRequest) -> AsyncGenerator[Frame, None]:
        if "tokens" not in request.engine_state:
            await self.prepare(request)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Any] = asyncio.Queue()
        cancel = threading.Event()

        def emit(item: Any) -> None:
            if not loop.is_closed():
                loop.call_soon_threadsafe(queue.put_nowait, item)

        job = loop.run_in_executor(self._executor, self._run, request, emit, cancel)
        try:
            while True:
                item = await queue.get()
                if item is _DONE:
                    break
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            cancel.set()
            # Wait (shielded from the cancellation that may have brought us here) until the
            # thread has stopped, so the model is free when our admission slot is released.
            with anyio.CancelScope(shield=True):
                await asyncio.shield(job)

    def _run(self, request: GenerationRequest, emit: Any, cancel: threading.Event) -> None:
        try:
            self._generate_sync(request, emit, cancel)
        except BaseException as exc:  # surfaces in the request's coroutine
            emit(exc)
        finally:
            emit(_DONE)

    def _generate_sync(
        self, request: GenerationRequest, emit: Any, cancel: threading.Event
    ) -> None:
        from llama_cpp import llama_vocab_is_eog

        llama = self._llama
        state = request.engine_state
        tokens: list[int] = state["tokens"]
        params = request.params
        defaults = self.config.defaults
        grammar = build_grammar(state["gbnf"]) if "gbnf" in state else None
        # A random seed per unseeded request; llama-cpp-python would otherwise derive one from
        # its previous seed, which makes consecutive requests correlated.
        llama.set_seed(params.seed if params.seed is not None else secrets.randbits(32))
        # Evaluate every prompt from scratch. llama-cpp-python would reuse the KV cache of the
        # previous request's matching prefix, but evaluating only the remaining suffix changes
        # the logits numerically, so the same request (same seed, or temperature 0) would give
        # different texts depending on what ran before it.
        llama.reset()
        text = TextAssembler(params.stop)
        vocab = llama._model.vocab
        produced, unsent, finish = 0, 0, "length"
        plan: ToolPlan | None = state.get("tools")
        trigger = (
            CallTrigger(plan.rules, self._grammar_piece, restart=True)
            if plan is not None and plan.gbnf is None
            else None
        )
        generated: list[int] = []
        # Logprobs of the `unsent` tokens; None when the request did not ask for them.
        pending: list[TokenLogprob] | None = [] if params.logprobs else None
        reader = self._logprobs
        assert reader is not None

        def run(prompt: list[int], grammar: Any) -> Iterator[int]:
            return llama.generate(  # type: ignore[no-any-return]
                prompt,
                top_k=defaults.top_k,
                top_p=params.top_p,
                min_p=defaults.min_p,
                temp=params.temperature,
                repeat_penalty=defaults.repeat_penalty,
                frequency_penalty=params.frequency_penalty,
                presence_penalty=params.presence_penalty,
                grammar=grammar,
                reset=True,
            )

        stream: Iterator[int] | None = run(tokens, grammar)
        while stream is not None:
            current, stream = stream, None
            for token in current:
                if cancel.is_set():
                    finish = "cancelled"
                    break
                if llama_vocab_is_eog(vocab, token):
                    finish = "stop"
                    break
                produced += 1
                unsent += 1
                if pending is not None:
                    # Llama.generate yields a token before evaluating it: the context still
                    # holds the logits it was sampled from, in its last output row.
                    pending.append(reader.read(llama._ctx.ctx, -1, token, params.top_logprobs))
                piece = text.push(llama._model.detokenize([token], special=False))
                if piece:  # text held back (partial stop string, split UTF-8) is counted later
                    # The first chunk says what the last does (see engine._sample).
                    cached = 0 if unsent == produced else None
                    emit(
                        Frame(
                            text=piece,
                            tokens=unsent,
                            logprobs=pending or None,
                            cached_tokens=cached,
                        )
                    )
                    unsent = 0
                    if pending:
                        pending = []
                if text.stopped:
                    finish = "stop"
                    break
                if produced >= params.max_tokens:
                    break
                if trigger is not None:  # auto tool choice, see tools/grammar.py
                    generated.append(token)
                    gbnf = trigger.push(token)
                    if not trigger.active:
                        trigger = None
                    if gbnf is not None:
                        # Llama's sampler takes no grammar mid-generation: restart after this
                        # token with the calls' grammar (the KV cache of what is out is reused).
                        stream = run(tokens + generated, build_grammar(gbnf))
                        break
            if hasattr(current, "close"):
                current.close()
        tail = text.flush() if finish != "cancelled" else ""
        emit(
            Frame(
                text=tail,
                finish_reason=finish,  # type: ignore[arg-type]
                prompt_tokens=len(tokens),
                completion_tokens=produced,
                logprobs=(pending or None) if finish != "cancelled" else None,
                cached_tokens=0,  # every prompt is evaluated whole (see above)
                stop_sequence=text.matched,
            )
        )
