"""Which sequences run in the next engine step, and which slot (llama.cpp seq id) each uses.

Pure bookkeeping, no llama.cpp calls, so the policy is easy to read:
- admission is FIFO into free slots, lowest id first; a freed slot remembers the tokens still
  in its KV cache (and which kernel computed each, see `exact_reuse`), so with `prefix_cache`
  a new sequence reuses as much of its prompt as that cache allows without changing its output
  (a shared system prompt is not evaluated again), and takes a higher free slot only when that
  one lets it reuse much more;
- each step decodes one token for every running sequence, then spends what is left of the
  per-step token budget on prompt chunks of sequences still prefilling, oldest first, so a long
  prompt is spread over several steps instead of freezing the running streams. Chunks are cut
  so that llama.cpp computes each token with the same kernel as a cold run would
  (`exact_reuse.next_chunk`);
- slots are handed out lowest id first and decode tokens are ordered by slot: with one KV
  stream per sequence, llama.cpp splits a batch into one micro-batch per run of consecutive
  sequence ids (`split_equal(sequential=true)`), so gaps between running ids cost extra passes.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass

from llm_api.services.llm.engine.exact_reuse import next_chunk, reusable_prefix
from llm_api.services.llm.engine.sequence import Sequence


@dataclass(slots=True)
class Work:
    """Tokens of one sequence in this step's batch: `tokens` at positions start.., with logits
    wanted for the last one when `sample` is set."""

    seq: Sequence
    tokens: list[int]
    start: int
    sample: bool


SCATTER_WORTH = 128  # prompt tokens of extra reuse that justify leaving the lowest free slot


class Scheduler:
    def __init__(self, slots: int, budget: int, *, prefix_cache: bool = True) -> None:
        self.budget = budget
        self.prefix_cache = prefix_cache
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.running: list[Sequence] = []
        self._free: list[int] = list(range(slots))
        # free slot -> (tokens still in its KV cache, the kernel that computed each)
        self._cached: dict[int, tuple[list[int], bytes]] = {}

    @property
    def idle(self) -> bool:
        return not self.waiting and not self.running

    def admit(self) -> list[tuple[Sequence, int]]:
        """Move waiting sequences into free slots. Returns (sequence, reused prefix length);
        the caller must drop the slot's KV cache from that position on."""
        admitted: list[tuple[Sequence, int]] = []
        while self.waiting and self._free:
            seq = self.waiting.popleft()
            slot, reuse = self._pick_slot(seq.prompt)
            self._free.remove(slot)
            _, kernels = self._cached.pop(slot, ([], b""))
            seq.slot, seq.n_past, seq.kernels = slot, reuse, bytearray(kernels[:reuse])
            self.running.append(seq)
            admitted.append((seq, reuse))
        return admitted

    def _pick_slot(self, prompt: list[int]) -> tuple[int, int]:
        lowest = min(self._free)
        if not self.prefix_cache:
            return lowest, 0
        reuse = dict.fromkeys(self._free, 0)
        for slot in self._free:
            if slot in self._cached:
                tokens, kernels = self._cached[slot]
                reuse[slot] = reusable_prefix(tokens, kernels, prompt, self.budget)
        best = max(sorted(self._free), key=reuse.__getitem__)  # ties: the lowest id
        # The lowest free slot never adds a run of consecutive running ids; another may, and
        # each run costs llama.cpp one more micro-batch in every decode step for as long as
        # the sequence runs (8 streams on scattered slots: ~97 ms a step here vs ~77 ms
        # packed). Only a much longer reuse is worth that.
        if reuse[best] - reuse[lowest] < SCATTER_WORTH:
            best = lowest
        return best, reuse[best]

    def release(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self._cached[seq.slot] = (seq.tokens[: seq.n_past], bytes(seq.kernels[: seq.n_past]))
        self._free.append(seq.slot)

    def plan(self) -> tuple[list[Work], list[Work]]:
        """This step's decode tokens (one llama_decode) and prompt chunks (one llama_decode
        each: alone in its call, a chunk is one micro-batch of known shape)."""
        running = sorted(self.running, key=lambda s: s.slot)
        decodes = [Work(s, [s.tokens[-1]], s.n_past, True) for s in running if not s.prefilling]
        prefills: list[Work] = []
        left = self.budget - len(decodes)
        for seq in self.running:
            pos, n = seq.n_past, len(seq.prompt)
            while left > 0 and pos < n:
                end = next_chunk(pos, n, left, self.budget)
                if end - pos > left and pos != seq.n_past:
                    break  # only a sequence's first chunk of a step may overrun the budget
                prefills.append(Work(seq, seq.prompt[pos:end], pos, end == n))
                left -= end - pos
                pos = end
        return decodes, prefills
