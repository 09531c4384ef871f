"""The batched engine: one thread per model owns the llama.cpp context and loops

    admit waiting sequences into free slots (copying another slot's KV stream when it holds a
    longer reusable prefix) → one llama_decode per prompt chunk of new ones (alone in its call,
    so llama.cpp computes it with the kernels a cold run would use, see `exact_reuse`), then
    one of one token per running sequence (new ones whose prompt just ended included), so that
    a new prompt does not wait behind the running decodes (`Scheduler.begin_step`); a
    newcomer that outranks everything left in the step (a tenant below its share) goes next,
    and may cut the call in flight short (`interrupt`); after each call, sample each sequence
    with its own sampler chain (and, for those that asked, read the logprobs from the same
    logits row: `logprobs`) → detokenize, apply stop sequences / max_tokens /
    end-of-generation → hand that call's output to the event loop in one call → free the
    slots of finished sequences.

Hand-written on llama-cpp-python's low-level bindings because its high-level `Llama` decodes one
sequence at a time. KV memory is fixed at start: `slots` sequences × `ctx_per_slot` tokens, one
KV stream per sequence (kv_unified off), so a sequence's attention only spans its own tokens.
"""

from __future__ import annotations

import collections
import threading
from typing import Any

import llama_cpp
import structlog

from llm_api.core import metrics
from llm_api.core.exceptions import InvalidRequestError, ServerError
from llm_api.services.llm.engine.exact_reuse import chunk_kernels, decode_kernel
from llm_api.services.llm.engine.interrupt import CallInterrupter
from llm_api.services.llm.engine.logprobs import LogprobReader
from llm_api.services.llm.engine.sampling import build_chain
from llm_api.services.llm.engine.scheduler import Scheduler, Work, copy_worth
from llm_api.services.llm.engine.sequence import DetokenizeFn, Outbox, Sequence
from llm_api.services.llm.registry import SamplingDefaults
from llm_api.services.llm.text_stream import TextAssembler
from llm_api.services.llm.types import FinishReason, Frame

log = structlog.get_logger(__name__)


class BatchEngine:
    def __init__(
        self,
        *,
        name: str,
        ctx: Any,  # llama_context_p, owned by the caller
        vocab: Any,
        n_vocab: int,
        slots: int,
        ctx_per_slot: int,
        n_batch: int,
        defaults: SamplingDefaults,
        detokenize: DetokenizeFn,
        prefix_cache: bool = True,
    ) -> None:
        self.name = name
        self._ctx = ctx
        self._mem = llama_cpp.llama_get_memory(ctx)
        self._vocab = vocab
        self._n_vocab = n_vocab
        self._ctx_per_slot = ctx_per_slot
        self._n_batch = n_batch
        self._defaults = defaults
        self._detokenize = detokenize
        self._logprobs = LogprobReader(n_vocab, detokenize)
        self._sched = Scheduler(
            slots, n_batch, prefix_cache=prefix_cache, copy_worth=copy_worth(ctx_per_slot)
        )
        self._inbox: collections.deque[Sequence] = collections.deque()
        self._wake = threading.Event()
        self._stopping = False
        self._failed: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name=f"llama-batch-{name}", daemon=True)
        self._batch = llama_cpp.llama_batch_init(n_batch, 0, 1)
        self._interrupt = CallInterrupter(ctx)
        self.steps = 0  # engine steps that evaluated tokens (for tests)
        self.prompt_tokens = 0  # prompt tokens admitted
        self.prompt_tokens_reused = 0  # of those, taken from a slot's KV cache (prefix_cache)
        self.kv_copies = 0  # KV streams copied from another slot to reuse its prefix
        self.interrupted = 0  # llama_decode calls cut short for an outranking newcomer
        # Tests set a list to record every llama_decode: (step, prompt chunk?, (slot, tokens)
        # per sequence in the call), steps counted as `steps` counts them.
        self.call_log: list[tuple[int, bool, tuple[tuple[int, int], ...]]] | None = None
        self._queries = metrics.PREFIX_CACHE_QUERIES.labels(name)
        self._hits = metrics.PREFIX_CACHE_HITS.labels(name)
        self._interrupted = metrics.ENGINE_CALLS_INTERRUPTED.labels(name)

    # --- called from the event loop ---------------------------------------------------------

    def start(self) -> None:
        llama_cpp.llama_memory_clear(self._mem, True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and self._failed is None

    @property
    def running(self) -> int:
        return len(self._sched.running)

    def submit(self, seq: Sequence) -> None:
        if not self.alive:
            raise ServerError(f"The engine of model `{self.name}` is not running.")
        self._inbox.append(seq)  # deque.append is thread-safe
        if self._sched.free_slots:  # it can start now: it may cut short a call that it outranks
            self._interrupt.request(seq.live_rank())
        self._wake.set()

    def cancel(self, seq: Sequence) -> None:
        seq.cancelled = True
        self._wake.set()

    def stop(self) -> None:
        """Stop the thread (pending sequences get an error), then free the batch."""
        self._stopping = True
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join()
        llama_cpp.llama_batch_free(self._batch)

    # --- the engine thread ------------------------------------------------------------------

    def _main(self) -> None:
        out = Outbox()
        try:
            while not self._stopping:
                if self._sched.idle and not self._inbox:
                    self._wake.wait()
                    self._wake.clear()
                    continue
                self._step(out)
                out.flush()
        except BaseException as exc:  # a llama.cpp failure: fail every sequence, stay down
            self._failed = exc
            log.exception("engine_failed", model=self.name)
        error = ServerError(f"The engine of model `{self.name}` stopped.")
        while self._inbox:
            self._sched.waiting.append(self._inbox.popleft())
        for seq in [*self._sched.running, *self._sched.waiting]:
            out.put(seq.sink, error)
            out.put(seq.sink, None)
            self._free_chain(seq)
        out.flush()

    def _step(self, out: Outbox) -> None:
        for seq in [s for s in self._sched.running if s.cancelled]:
            self._finish(seq, "cancelled", out)
        self._admit(out)
        # Prompt chunks first, then the decode call (why: Scheduler.begin_step). Output leaves
        # after each call, not at the end of the step: a new sequence gets its first token as
        # soon as its prompt is done.
        self._sched.begin_step()
        self._interrupt.arm()
        evaluated = False
        while True:
            if self._inbox:  # a newcomer that outranks what comes next goes first
                self._admit(out, ahead=True)
            chunk = self._sched.next_prefill()  # alone in its call: a micro-batch of known shape
            work = [chunk] if chunk is not None else self._sched.decode_tokens()
            if not work:
                break
            if not self._run(work, out):  # cut short for a newcomer: nothing was evaluated
                if chunk is not None:
                    self._sched.retract(chunk)
                continue
            out.flush()
            evaluated = True
            if chunk is None:  # the decode call ends the step
                break
        if evaluated:
            self.steps += 1

    def _admit(self, out: Outbox, ahead: bool = False) -> None:
        """Take submitted sequences, drop cancelled waiting ones, and set up those that get
        a slot (between prompt chunks, `ahead`: only those that outrank the pending ones)."""
        while self._inbox:
            self._sched.waiting.append(self._inbox.popleft())
        for seq in [s for s in self._sched.waiting if s.cancelled]:
            self._sched.waiting.remove(seq)
            out.put(seq.sink, None)
        for adm in self._sched.admit_ahead() if ahead else self._sched.admit():
            seq, reuse = adm.seq, adm.reuse
            if adm.donor is not None:
                # llama.cpp copies the whole stream before the next llama_decode evaluates
                # anything, in call order, so the donor may be running or reused this step.
                llama_cpp.llama_memory_seq_cp(self._mem, adm.donor, seq.slot, -1, -1)
                self.kv_copies += 1
            # Drop whatever the slot's previous user (or the donor) has beyond the prefix.
            llama_cpp.llama_memory_seq_rm(self._mem, seq.slot, reuse, -1)
            self.prompt_tokens += len(seq.prompt)
            self.prompt_tokens_reused += reuse
            seq.reused = reuse
            seq.logprobs = [] if seq.params.logprobs else None
            self._queries.inc(len(seq.prompt))
            self._hits.inc(reuse)
            seq.text = TextAssembler(seq.params.stop)
            seq.chain = build_chain(
                seq.params,
                self._defaults,
                vocab=self._vocab,
                n_vocab=self._n_vocab,
                gbnf=seq.gbnf,
                seed=seq.seed,
            )

    def _run(self, work: list[Work], out: Outbox) -> bool:
        """One llama_decode over `work`, then sample the sequences that want a token; False
        when the call was cut short (`interrupt`), having changed nothing."""
        outputs = self._fill(work)
        chunk = work[0].seq.prefilling  # a prompt chunk (alone in its call), else the decode call
        rank = min(w.seq.live_rank() for w in work)
        self._interrupt.begin(rank, self._batch.n_tokens, chunk)
        rc = llama_cpp.llama_decode(self._ctx, self._batch)
        if self._interrupt.end(rc):
            # llama.cpp dropped the aborted micro-batch's cells; earlier micro-batches of the
            # call (one per run of consecutive slots) stay unless removed here.
            for w in work:
                llama_cpp.llama_memory_seq_rm(self._mem, w.seq.slot, w.start, -1)
            self.interrupted += 1
            self._interrupted.inc()
            return False
        if self.call_log is not None:
            shape = tuple((w.seq.slot, len(w.tokens)) for w in work)
            self.call_log.append((self.steps, chunk, shape))
        if rc != 0:
            # Cannot happen while slots × ctx_per_slot bound every sequence; if it does, fail
            # these sequences rather than the whole engine.
            log.error("llama_decode_failed", model=self.name, rc=rc)
            for w in work:
                out.put(w.seq.sink, ServerError("Generation failed in llama_decode."))
                self._finish(w.seq, "error", out, send=False)
            return True
        for w in work:
            seq, end = w.seq, w.start + len(w.tokens)
            prefill = seq.n_past < len(seq.prompt)
            seq.kernels += chunk_kernels(w.start, end) if prefill else decode_kernel(w.start)
            seq.n_past = end
        for w, idx in outputs:
            self._sample(w.seq, idx, out)
        return True

    def _fill(self, work: list[Work]) -> list[tuple[Work, int]]:
        b = self._batch
        token, pos, n_seq_id, seq_id, logits = b.token, b.pos, b.n_seq_id, b.seq_id, b.logits
        i = 0
        outputs: list[tuple[Work, int]] = []
        for w in work:
            slot, start = w.seq.slot, w.start
            for j, t in enumerate(w.tokens):
                token[i] = t
                pos[i] = start + j
                n_seq_id[i] = 1
                seq_id[i][0] = slot
                logits[i] = 0
                i += 1
            if w.sample:
                logits[i - 1] = 1
                outputs.append((w, i - 1))
        b.n_tokens = i
        return outputs

    def _sample(self, seq: Sequence, idx: int, out: Outbox) -> None:
        token = llama_cpp.llama_sampler_sample(seq.chain, self._ctx, idx)
        if llama_cpp.llama_vocab_is_eog(self._vocab, token):
            self._finish(seq, "stop", out)
            return
        seq.produced += 1
        seq.unsent += 1
        if seq.logprobs is not None:  # only sequences that asked pay for it
            # Read before the next llama_decode overwrites this row's logits.
            seq.logprobs.append(self._logprobs.read(self._ctx, idx, token, seq.params.top_logprobs))
        assert seq.text is not None
        piece = seq.text.push(self._detokenize(token))
        if piece:  # text held back (partial stop string, split UTF-8) is counted later
            lps = seq.take_logprobs()  # they travel with the text of their tokens
            # The first chunk carries the reused prefix too (the last one always does), for a
            # reader that stops before the end (one tool call made, parallel calls off).
            cached = seq.reused if seq.unsent == seq.produced else None
            out.put(
                seq.sink,
                Frame(text=piece, tokens=seq.unsent, logprobs=lps, cached_tokens=cached),
            )
            seq.unsent = 0
        if seq.text.stopped:
            self._finish(seq, "stop", out)
        elif seq.produced >= seq.params.max_tokens or len(seq.tokens) + 1 > self._ctx_per_slot:
            self._finish(seq, "length", out)
        else:
            seq.tokens.append(token)
            if seq.trigger is not None:
                self._watch_trigger(seq, token)

    def _watch_trigger(self, seq: Sequence, token: int) -> None:
        """auto tool choice: once the output opens a call, swap in a chain whose grammar
        matches the output so far and then only valid calls, and feed it that output."""
        assert seq.trigger is not None
        gbnf = seq.trigger.push(token)
        if not seq.trigger.active:
            seq.trigger = None
        if gbnf is None:
            return
        try:
            chain = build_chain(
                seq.params,
                self._defaults,
                vocab=self._vocab,
                n_vocab=self._n_vocab,
                gbnf=gbnf,
                seed=seq.seed,
            )
        except InvalidRequestError:  # checked in prepare(); stay unconstrained (parser checks)
            log.warning("tool_grammar_rejected", model=self.name)
            return
        for t in seq.tokens[len(seq.prompt) :]:
            llama_cpp.llama_sampler_accept(chain, t)
        self._free_chain(seq)
        seq.chain = chain

    def _finish(self, seq: Sequence, reason: FinishReason, out: Outbox, send: bool = True) -> None:
        seq.finish = reason
        if send:
            cancelled = reason == "cancelled"
            tail = seq.text.flush() if seq.text is not None and not cancelled else ""
            out.put(
                seq.sink,
                Frame(
                    text=tail,
                    finish_reason=reason,
                    prompt_tokens=len(seq.prompt),
                    completion_tokens=seq.produced,
                    # Tokens whose text was held back to the end (or cut by a stop string).
                    logprobs=None if cancelled else seq.take_logprobs(),
                    cached_tokens=seq.reused,
                    stop_sequence=seq.text.matched if seq.text is not None else None,
                ),
            )
        self._free_chain(seq)
        if reason == "error":
            seq.n_past = 0
            llama_cpp.llama_memory_seq_rm(self._mem, seq.slot, 0, -1)
        self._sched.release(seq)
        out.put(seq.sink, None)

    @staticmethod
    def _free_chain(seq: Sequence) -> None:
        if seq.chain is not None:
            llama_cpp.llama_sampler_free(seq.chain)
            seq.chain = None
