"""Which sequences run in the next engine step, and which slot (llama.cpp seq id) each uses.

Pure bookkeeping, no llama.cpp calls, so the policy is easy to read:
- admission is FIFO into free slots; a freed slot remembers the tokens still in its KV cache,
  and a new sequence takes the free slot whose cache shares the longest prefix with its prompt
  (a shared system prompt is then not evaluated again);
- each step decodes one token for every running sequence, then spends what is left of the
  per-step token budget on prompt chunks of sequences still prefilling, oldest first, so a long
  prompt is spread over several steps instead of freezing the running streams;
- slots are handed out lowest id first and a step's tokens are ordered by slot: with one KV
  stream per sequence, llama.cpp splits a batch into one micro-batch per run of consecutive
  sequence ids (`split_equal(sequential=true)`), so gaps between running ids cost extra passes.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass

from llm_api.services.llm.engine.sequence import Sequence


@dataclass(slots=True)
class Work:
    """Tokens of one sequence in this step's batch: `tokens` at positions start.., with logits
    wanted for the last one when `sample` is set."""

    seq: Sequence
    tokens: list[int]
    start: int
    sample: bool


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class Scheduler:
    def __init__(self, slots: int, budget: int, *, prefix_cache: bool = True) -> None:
        self.budget = budget
        self.prefix_cache = prefix_cache
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.running: list[Sequence] = []
        self._free: list[int] = list(range(slots))
        self._cached: dict[int, list[int]] = {}  # free slot -> tokens still in its KV cache

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
            self._cached.pop(slot, None)
            seq.slot, seq.n_past = slot, reuse
            self.running.append(seq)
            admitted.append((seq, reuse))
        return admitted

    def _pick_slot(self, prompt: list[int]) -> tuple[int, int]:
        best, best_len = min(self._free), 0
        if self.prefix_cache:
            for slot in self._free:
                n = common_prefix(self._cached.get(slot, []), prompt)
                if n > best_len:
                    best, best_len = slot, n
        # At least the last prompt token must be evaluated: its logits give the first token.
        return best, min(best_len, len(prompt) - 1)

    def release(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self._cached[seq.slot] = seq.tokens[: seq.n_past]
        self._free.append(seq.slot)

    def plan(self) -> list[Work]:
        work: list[Work] = []
        for seq in self.running:
            if not seq.prefilling:
                work.append(Work(seq, [seq.tokens[-1]], seq.n_past, True))
        left = self.budget - len(work)
        for seq in self.running:
            if left <= 0:
                break
            if seq.prefilling:
                chunk = seq.prompt[seq.n_past : seq.n_past + left]
                done = seq.n_past + len(chunk) == len(seq.prompt)
                work.append(Work(seq, chunk, seq.n_past, done))
                left -= len(chunk)
        work.sort(key=lambda w: w.seq.slot)
        return work
