"""Which sequences run in the next engine step, and which slot (llama.cpp seq id) each uses.

Pure bookkeeping, no llama.cpp calls, so the policy is easy to read:
- admission goes by `Sequence.live_rank` (priority class, then the tenant's share of the model:
  its other requests holding a slot, per weight, as the admission gate counts them now;
  services/llm/admission.py), then arrival, into the lowest free
  slot. With `prefix_cache` a new sequence reuses as much of its prompt as some slot's KV
  cache allows without changing its output (a shared system prompt is not evaluated again):
  its own slot's leftovers, or, when another slot (free or running) holds a longer usable
  prefix, a copy of that slot's KV stream. Every slot and running sequence knows which kernel
  computed each cached token (see `exact_reuse`);
- each step first spends the per-step token budget, less one token per running sequence, on
  prompt chunks of sequences still prefilling, lowest rank first, then oldest, so a long
  prompt is spread over several steps instead of freezing the running streams, and a tenant
  holding little of the model is not queued behind a busy tenant's burst of new prompts; then
  it decodes one token for every running sequence past its prompt (those whose prompt ended
  in this step's chunks included).
  Chunks are cut so that llama.cpp computes each token with the same kernel as a cold run
  would (`exact_reuse.next_chunk`);
- slots are handed out lowest id first and decode tokens are ordered by slot: with one KV
  stream per sequence, llama.cpp splits a batch into one micro-batch per run of consecutive
  sequence ids (`split_equal(sequential=true)`), so gaps between running ids cost extra passes
  (8 streams on scattered slots: ~97 ms a step vs ~77 ms packed, measured). Copying a KV
  stream keeps them packed where picking the slot that holds the prefix would scatter them.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass

from llm_api.services.llm.engine.exact_reuse import next_chunk, reusable_prefix, reuse_ceiling
from llm_api.services.llm.engine.sequence import Sequence


@dataclass(slots=True)
class Work:
    """Tokens of one sequence in this step's batch: `tokens` at positions start.., with logits
    wanted for the last one when `sample` is set."""

    seq: Sequence
    tokens: list[int]
    start: int
    sample: bool
    first: bool = False  # a prompt chunk: the sequence's first of this step


@dataclass(slots=True)
class Admission:
    """A sequence placed in `seq.slot`. The engine first copies slot `donor`'s KV stream into
    it when set, then drops the slot's cache from position `reuse` on."""

    seq: Sequence
    reuse: int
    donor: int | None = None


def copy_worth(ctx_per_slot: int) -> int:
    """Prompt tokens a KV-stream copy must save to pay for itself. llama.cpp copies a whole
    stream (`ctx_per_slot` cells), whatever the prefix length: measured with SmolLM2-135M on
    a 2-vCPU EPYC, ~7.5 ms for 2,048 cells and ~29 ms for 8,192, while a prompt token costs
    4-5 ms to evaluate. Half a token per 256 cells would break even; twice that is required."""
    return max(1, ctx_per_slot // 512)


class Scheduler:
    def __init__(
        self, slots: int, budget: int, *, prefix_cache: bool = True, copy_worth: int = 4
    ) -> None:
        self.budget = budget
        self.prefix_cache = prefix_cache
        self.copy_worth = copy_worth
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.running: list[Sequence] = []
        self._free: list[int] = list(range(slots))
        # free slot -> (tokens still in its KV cache, the kernel that computed each)
        self._cached: dict[int, tuple[list[int], bytes]] = {}
        self.begin_step()

    @property
    def idle(self) -> bool:
        return not self.waiting and not self.running

    @property
    def free_slots(self) -> int:
        return len(self._free)

    def admit(self, below: tuple[int, float] | None = None) -> list[Admission]:
        """Move waiting sequences (only those ranked below `below`, when set) into free
        slots, lowest id first, with the prefix each reuses and the slot to copy it from."""
        admitted: list[Admission] = []
        while self._free:
            # The first of the lowest rank.
            seq = min(self.waiting, key=_rank, default=None)
            if seq is None or (below is not None and _rank(seq) >= below):
                break
            self.waiting.remove(seq)
            slot = min(self._free)
            self._free.remove(slot)
            own = self._cached.pop(slot, ([], b""))
            adm = Admission(seq, 0)
            kernels: bytes | bytearray = own[1]
            if self.prefix_cache:
                adm.reuse = reusable_prefix(*own, seq.prompt, self.budget) if own[0] else 0
                donor, reuse, donor_kernels = self._best_donor(seq.prompt, adm.reuse)
                if donor is not None:
                    adm.donor, adm.reuse, kernels = donor, reuse, donor_kernels
            seq.slot, seq.n_past, seq.tokens = slot, adm.reuse, list(seq.prompt)
            seq.kernels = bytearray(kernels[: adm.reuse])
            self.running.append(seq)
            admitted.append(adm)
        return admitted

    def admit_ahead(self) -> list[Admission]:
        """Within a step: admit only waiting sequences ranked below everything the step has
        still to evaluate: every running sequence still prefilling or, once none is, every
        one in the decode call."""
        pending = [_rank(s) for s in self.running if s.prefilling] or [
            _rank(s) for s in self.running
        ]
        return self.admit(below=min(pending)) if pending else self.admit()

    def _best_donor(self, prompt: list[int], own: int) -> tuple[int | None, int, bytes | bytearray]:
        """The slot (free or running) whose cache would let `prompt` reuse at least
        `copy_worth` more tokens than its own slot does, and how many."""
        best: tuple[int | None, int, bytes | bytearray] = (None, own + self.copy_worth - 1, b"")
        # Stop at the first donor that gives the most any cache could (with a common system
        # prompt in every slot, the first one does).
        ceiling = reuse_ceiling(len(prompt), self.budget)
        if ceiling <= best[1]:
            return None, own, b""
        # A running sequence's KV cache holds its first n_past tokens, one kernel each.
        sources: list[tuple[int, list[int], bytes | bytearray]] = [
            (slot, tokens, kernels) for slot, (tokens, kernels) in self._cached.items()
        ]
        sources += [(s.slot, s.tokens, s.kernels) for s in self.running]
        for slot, tokens, kernels in sources:
            if len(kernels) > best[1]:
                reuse = reusable_prefix(tokens, kernels, prompt, self.budget)
                if reuse > best[1]:
                    best = (slot, reuse, kernels)
                    if reuse == ceiling:
                        break
        return best if best[0] is not None else (None, own, b"")

    def release(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self._cached[seq.slot] = (seq.tokens[: seq.n_past], bytes(seq.kernels[: seq.n_past]))
        self._free.append(seq.slot)

    # --- one engine step: prompt chunks first, then one decode token per running sequence ---
    # What this order buys: time to first token with every slot busy. A prompt admitted at
    # the start of a step gets its first token after its own chunks (and those of prompts
    # admitted before it), instead of after a decode call over all running streams as well
    # (~80-90 ms for 16 streams on 2 cores; bench/RESULTS.md). Running streams still get one
    # token per step, and a step is as long either way. A sequence whose prompt ends in this
    # step's chunks joins this step's decode call. Admission stays at step boundaries:
    # admitting between chunks as well, measured, let staggered arrivals on a loaded host hold
    # the decode call back until the budget ran out, which started every stream in the same
    # step, so they all ended, and their next prompts all arrived, in one burst. The one
    # exception is `admit_ahead`: a sequence that outranks everything still to be evaluated in
    # this step (a tenant holding little of the model, arriving while a busy tenant's burst of
    # prompts or its decode call is evaluated) joins mid-step and goes next, instead of waiting
    # for the rest of the burst and the decode call; the engine may even cut the call in flight
    # short for it (engine/interrupt.py). It cannot hold the decode back for long: only a better
    # rank gets in, and the step's budget still bounds the chunks.

    def begin_step(self) -> None:
        self._spent = 0
        self._chunked: set[int] = set()  # id() of sequences with a chunk in this step

    def next_prefill(self) -> Work | None:
        """The next prompt chunk of this step (one llama_decode: alone in its call, a chunk is
        one micro-batch of known shape), lowest rank first, then oldest, within the step's token
        budget less one decode token for every running sequence; None when the step's
        prefill is done. The caller evaluates it (advancing `n_past`) before asking again."""
        left = self.budget - len(self.running) - self._spent
        for seq in sorted(self.running, key=_rank):  # stable: oldest first within a rank
            if not seq.prefilling:
                continue
            if left <= 0:
                return None
            pos, n = seq.n_past, len(seq.prompt)
            end = next_chunk(pos, n, left, self.budget)
            if end - pos > left and id(seq) in self._chunked:
                continue  # only a sequence's first chunk of a step may overrun the budget
            self._spent += end - pos
            first = id(seq) not in self._chunked
            self._chunked.add(id(seq))
            return Work(seq, seq.prompt[pos:end], pos, end == n, first)
        return None

    def retract(self, chunk: Work) -> None:
        """`chunk` (from next_prefill) was not evaluated after all (its call was cut short):
        give back its share of the step's budget."""
        self._spent -= len(chunk.tokens)
        if chunk.first:
            self._chunked.discard(id(chunk.seq))

    def decode_tokens(self) -> list[Work]:
        """One token for every running sequence past its prompt, ordered by slot (one
        llama_decode; see the module docstring for why the order matters)."""
        running = sorted(self.running, key=lambda s: s.slot)
        return [Work(s, [s.tokens[-1]], s.n_past, True) for s in running if not s.prefilling]


def _rank(seq: Sequence) -> tuple[int, float]:
    return seq.live_rank()
