"""In-process llama.cpp embedding model (BERT family), with a batcher that packs the inputs of
every concurrent request into shared `llama_decode` calls.

One engine thread owns the llama.cpp context. `embed()` hands it a job (a list of token lists);
each step the thread fills one batch, up to `n_batch` tokens and `slots` sequences, taking one
input from each waiting job in turn (round-robin), so a request with 2,048 inputs takes a fair
share of every batch and a one-input request that arrives meanwhile rides in the next one.
The model's own pooling (mean or CLS, from the GGUF) runs inside llama.cpp; vectors are then
L2-normalised, as sentence-transformers' Normalize module does.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import threading
from collections import deque
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import llama_cpp
import numpy as np
import structlog
from llama_cpp import _internals

from llm_api.core.cpus import available_cpus
from llm_api.core.exceptions import InvalidRequestError, ServiceUnavailableError
from llm_api.services.llm.backends import llama_log
from llm_api.services.llm.registry import ModelConfig
from llm_api.services.llm.types import Frame, GenerationRequest

log = structlog.get_logger(__name__)

DEFAULT_CACHE_DIR = Path("~/.cache/llm-api")


@dataclass(eq=False)
class _Job:
    inputs: list[list[int]]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[list[list[float]]]
    results: list[list[float] | None] = field(default_factory=list)
    next: int = 0  # the next input to schedule
    done: int = 0
    cancelled: bool = False

    def finish(self, result: list[list[float]] | BaseException) -> None:
        def settle() -> None:
            if self.future.done():
                return
            if isinstance(result, BaseException):
                self.future.set_exception(result)
            else:
                self.future.set_result(result)

        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is waiting
            self.loop.call_soon_threadsafe(settle)


class _Batcher:
    """The engine thread. Only it touches the llama.cpp context."""

    def __init__(self, ctx: Any, *, n_embd: int, max_tokens: int, max_seqs: int, name: str):
        self._ctx = ctx
        self._n_embd = n_embd
        self._max_tokens = max_tokens
        self._max_seqs = max_seqs
        self._jobs: deque[_Job] = deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name=f"embed-{name}", daemon=True)
        # One llama_batch whose arrays are numpy buffers, filled with slice assignments.
        self._tok = np.zeros(max_tokens, np.int32)
        self._pos = np.zeros(max_tokens, np.int32)
        self._nseq = np.ones(max_tokens, np.int32)
        self._seq = np.zeros(max_tokens, np.int32)
        self._out = np.ones(max_tokens, np.int8)  # every token is an output (pooled per seq)
        i32p = ctypes.POINTER(ctypes.c_int32)
        base = self._seq.ctypes.data
        self._seq_ptrs = (i32p * max_tokens)(
            *(ctypes.cast(base + 4 * i, i32p) for i in range(max_tokens))
        )
        self._batch = llama_cpp.llama_batch(
            n_tokens=0,
            token=self._tok.ctypes.data_as(i32p),
            embd=None,
            pos=self._pos.ctypes.data_as(i32p),
            n_seq_id=self._nseq.ctypes.data_as(i32p),
            seq_id=ctypes.cast(self._seq_ptrs, ctypes.POINTER(i32p)),
            logits=self._out.ctypes.data_as(ctypes.POINTER(ctypes.c_int8)),
        )
        self.alive = False
        self.steps = 0  # decode calls so far (tests and the benchmark read it)

    def start(self) -> None:
        self.alive = True
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join()

    def submit(self, job: _Job) -> None:
        with self._cond:
            if self._stopping:
                raise ServiceUnavailableError("The embedding model is shutting down.")
            self._jobs.append(job)
            self._cond.notify()

    def cancel(self, job: _Job) -> None:
        with self._cond:
            job.cancelled = True

    # --- the thread -------------------------------------------------------------------------

    def _take(self) -> list[tuple[_Job, int]]:
        """One batch: round-robin over the waiting jobs, one input each per round."""
        picks: list[tuple[_Job, int]] = []
        tokens = 0
        full: set[int] = set()
        while len(picks) < self._max_seqs:
            progressed = False
            for job in self._jobs:
                if job.next >= len(job.inputs) or id(job) in full:
                    continue
                n = len(job.inputs[job.next])
                if tokens + n > self._max_tokens:
                    full.add(id(job))  # a shorter input of another job may still fit
                    continue
                picks.append((job, job.next))
                job.next += 1
                tokens += n
                progressed = True
                if len(picks) == self._max_seqs:
                    break
            if not progressed:
                break
        # Start the next batch's round with another job, so no job always goes first.
        self._jobs.rotate(-1)
        return picks

    def _run(self) -> None:
        try:
            while True:
                with self._cond:
                    while True:
                        for job in [j for j in self._jobs if j.cancelled]:
                            self._jobs.remove(job)
                        if self._stopping:
                            for job in self._jobs:
                                job.finish(ServiceUnavailableError("The model is shutting down."))
                            return
                        picks = self._take()
                        if picks:
                            break
                        self._cond.wait()
                try:
                    vectors = self._decode([job.inputs[i] for job, i in picks])
                except Exception as exc:
                    log.exception("embedding_decode_failed")
                    with self._cond:
                        for job in {id(j): j for j, _ in picks}.values():
                            if job in self._jobs:
                                self._jobs.remove(job)
                            job.finish(ServiceUnavailableError(f"Embedding failed: {exc}"))
                    continue
                with self._cond:
                    for (job, i), vec in zip(picks, vectors, strict=True):
                        job.results[i] = vec
                        job.done += 1
                        if job.done == len(job.inputs):
                            if job in self._jobs:
                                self._jobs.remove(job)
                            job.finish([v for v in job.results if v is not None])
        finally:
            self.alive = False

    def _decode(self, seqs: list[list[int]]) -> list[list[float]]:
        n = 0
        for s, tokens in enumerate(seqs):
            m = len(tokens)
            self._tok[n : n + m] = tokens
            self._pos[n : n + m] = np.arange(m, dtype=np.int32)
            self._seq[n : n + m] = s
            n += m
        self._batch.n_tokens = n
        mem = llama_cpp.llama_get_memory(self._ctx)
        if mem:  # encoder-only models have no KV cache; others must start each batch clean
            llama_cpp.llama_memory_clear(mem, True)
        rc = llama_cpp.llama_decode(self._ctx, self._batch)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc}")
        self.steps += 1
        out = np.empty((len(seqs), self._n_embd), np.float32)
        for s in range(len(seqs)):
            ptr = llama_cpp.llama_get_embeddings_seq(self._ctx, s)
            if not ptr:
                raise RuntimeError("the model returned no pooled embedding")
            out[s] = np.ctypeslib.as_array(ptr, shape=(self._n_embd,))
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        out /= np.maximum(norms, 1e-12)
        result: list[list[float]] = out.tolist()
        return result


class LlamaEmbeddingBackend:
    def __init__(
        self, config: ModelConfig, *, threads: int | None = None, cache_dir: Path | None = None
    ) -> None:
        self.config = config
        self._threads = threads or available_cpus()
        self._cache_dir = (cache_dir or DEFAULT_CACHE_DIR).expanduser()
        self._model: Any = None
        self._ctx: Any = None
        self._batcher: _Batcher | None = None
        self._n_vocab = 0
        self._dimensions: int | None = None
        self._context_length = config.context_length
        self._ready = False

    @property
    def ready(self) -> bool:
        return self._ready and self._batcher is not None and self._batcher.alive

    @property
    def context_length(self) -> int:
        """The most tokens one input may have (special tokens included)."""
        return self._context_length

    @property
    def dimensions(self) -> int:
        if self._dimensions is None:
            raise RuntimeError(f"model {self.config.id} is not loaded")
        return self._dimensions

    @property
    def batcher(self) -> _Batcher | None:
        return self._batcher

    # --- lifecycle ------------------------------------------------------------------------------

    async def start(self, warmup: bool = True) -> None:
        await asyncio.to_thread(self._load)
        if warmup:
            await self.embed([self.tokenize("warm up")])
        self._ready = True

    def _load(self) -> None:
        cfg = self.config
        llama_cpp.llama_backend_init()
        llama_log.install()
        path = cfg.embedding_gguf_path(self._cache_dir)
        self._model = _internals.LlamaModel(
            path_model=str(path), params=llama_cpp.llama_model_default_params(), verbose=False
        )
        self._context_length = min(cfg.context_length, self._model.n_ctx_train())
        params = llama_cpp.llama_context_default_params()
        params.embeddings = True
        params.pooling_type = llama_cpp.LLAMA_POOLING_TYPE_UNSPECIFIED  # the model's own
        # A non-causal model must see a whole sequence in one micro-batch: one batch = one
        # ubatch, and the context is just that batch (BERT keeps no KV cache between calls).
        params.n_ctx = cfg.n_batch
        params.n_batch = cfg.n_batch
        params.n_ubatch = cfg.n_batch
        params.n_seq_max = cfg.slots
        params.n_threads = self._threads
        params.n_threads_batch = self._threads
        params.flash_attn_type = (
            llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED
            if cfg.flash_attn
            else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
        )
        self._ctx = _internals.LlamaContext(model=self._model, params=params, verbose=False)
        if llama_cpp.llama_pooling_type(self._ctx.ctx) == llama_cpp.LLAMA_POOLING_TYPE_NONE:
            raise ValueError(f"model {cfg.id}: the GGUF declares no pooling; not an embedder")
        self._n_vocab = self._model.n_vocab()
        self._dimensions = self._model.n_embd()
        self._batcher = _Batcher(
            self._ctx.ctx,
            n_embd=self._dimensions,
            max_tokens=cfg.n_batch,
            max_seqs=cfg.slots,
            name=cfg.id,
        )
        self._batcher.start()
        log.info(
            "model_loaded",
            model=cfg.id,
            path=path.name,
            engine="embedding",
            dimensions=self._dimensions,
            n_batch=cfg.n_batch,
            slots=cfg.slots,
        )

    async def aclose(self) -> None:
        self._ready = False
        if self._batcher is not None:
            await asyncio.to_thread(self._batcher.stop)
            self._batcher = None
        if self._ctx is not None:
            self._ctx.close()
            self._ctx = None
        if self._model is not None:
            self._model.close()
            self._model = None

    # --- requests -------------------------------------------------------------------------------

    def tokenize(self, text: str) -> list[int]:
        """Token ids with the model's special tokens ([CLS] … [SEP] for BERT). Text that looks
        like a special token stays plain text."""
        model = self._model
        if model is None:
            raise ServiceUnavailableError(f"Model `{self.config.id}` is loading; retry shortly.")
        return list(model.tokenize(text.encode("utf-8"), True, False))

    async def embed(self, inputs: list[list[int]]) -> list[list[float]]:
        """One L2-normalised vector per token list, in order."""
        batcher = self._batcher
        if batcher is None or not batcher.alive:
            raise ServiceUnavailableError(f"Model `{self.config.id}` is loading; retry shortly.")
        for i, tokens in enumerate(inputs):
            if not tokens:
                raise InvalidRequestError(f"Input {i} is empty.", param="input")
            if len(tokens) > self._context_length:
                raise InvalidRequestError(
                    f"Input {i} has {len(tokens)} tokens; model `{self.config.id}` takes at "
                    f"most {self._context_length}.",
                    param="input",
                )
            if min(tokens) < 0 or max(tokens) >= self._n_vocab:
                raise InvalidRequestError(
                    f"Input {i} has a token id outside the vocabulary (0 to {self._n_vocab - 1}).",
                    param="input",
                )
        if not inputs:
            return []
        loop = asyncio.get_running_loop()
        job = _Job(inputs=inputs, loop=loop, future=loop.create_future())
        job.results = [None] * len(inputs)
        batcher.submit(job)
        try:
            return await job.future
        finally:
            if not job.future.done():
                batcher.cancel(job)  # cancelled caller: its remaining inputs are dropped

    # --- chat requests: not an option for an embedding model -------------------------------------

    async def prepare(self, request: GenerationRequest) -> None:
        raise InvalidRequestError(
            f"Model `{self.config.id}` is an embedding model; use /v1/embeddings.", param="model"
        )

    def generate(self, request: GenerationRequest) -> AsyncGenerator[Frame, None]:
        raise InvalidRequestError(
            f"Model `{self.config.id}` is an embedding model; use /v1/embeddings.", param="model"
        )
