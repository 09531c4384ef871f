"""The rule for reusing cached KV without changing output (engine/exact_reuse.py), as pure
functions; tests/test_batching.py checks the outputs themselves against a cold run."""

from __future__ import annotations

from llm_api.services.llm.engine.exact_reuse import (
    chunk_kernels,
    cold_kernels,
    decode_kernel,
    planned_kernels,
    reusable_prefix,
    reuse_ceiling,
)
from llm_api.services.llm.engine.scheduler import Admission, Scheduler, copy_worth
from llm_api.services.llm.engine.sequence import Sequence

B = 512  # n_batch: the micro-batch of a cold run


def test_cold_kernels_follow_the_micro_batch_shape() -> None:
    assert cold_kernels(60, B) == b"R" * 60  # fewer than 64 rows: the per-row kernel
    assert cold_kernels(130, B) == b"T" * 130  # one micro-batch of 130 rows: tiled
    assert cold_kernels(540, B) == b"T" * 512 + b"R" * 28  # a short last micro-batch
    assert cold_kernels(513, B) == b"T" * 512 + b"X"  # a lone last row past 256: split-KV
    assert cold_kernels(65, 64) == b"T" * 64 + b"R"  # a lone row below 256 is still per-row
    assert chunk_kernels(30, 64) == b"R" * 34
    assert decode_kernel(10) == b"R" and decode_kernel(300) == b"D"


def test_a_short_prompt_reuses_its_whole_shared_prefix() -> None:
    header = list(range(25))
    old, new = header + [900] * 30, header + [901] * 35
    assert reusable_prefix(old, cold_kernels(len(old), B), new, B) == 25
    assert reusable_prefix(old, cold_kernels(len(old), B), old, B) == len(old) - 1  # not all


def test_reuse_leaves_enough_rows_for_the_kernel_of_a_cold_run() -> None:
    system = list(range(300))
    old = system + [900] * 15
    new = system + [901] * 20  # cold: 320 rows, tiled
    # Reusing all 300 shared tokens would evaluate 20 rows with the per-row kernel.
    assert reusable_prefix(old, cold_kernels(len(old), B), new, B) == 256
    longer = system + [901] * 200
    assert reusable_prefix(old, cold_kernels(len(old), B), longer, B) == 300
    # A cache filled by a 40-token prompt holds per-row results where a cold run tiles.
    assert reusable_prefix(system[:40], cold_kernels(40, B), new, B) == 0


def test_the_last_row_past_a_micro_batch_keeps_its_kernel() -> None:
    prompt = list(range(514))  # cold: 512 tiled, then 2 rows per-row
    assert reusable_prefix(prompt[:513], cold_kernels(513, B), prompt, B) == 512
    single = prompt[:513]  # cold: 512 tiled, then the split-KV kernel for the last row
    assert reusable_prefix(single[:512], cold_kernels(512, B), single, B) == 512


def test_generated_tokens_are_reused_only_where_a_prompt_would_compute_them_alike() -> None:
    turn = list(range(40))
    answer = [500 + i for i in range(10)]
    kernels = cold_kernels(40, B) + b"".join(decode_kernel(40 + i) for i in range(10))
    follow_up = turn + answer + [9] * 5  # 55 tokens: per-row in a cold run, like the decode
    assert reusable_prefix(turn + answer, kernels, follow_up, B) == 50
    longer = turn + answer + [9] * 30  # 80 tokens: a cold run tiles them
    assert reusable_prefix(turn + answer, kernels, longer, B) == 0


def _running(scheduler: Scheduler, prompt: list[int], reused: int | None = None) -> Sequence:
    """Admit `prompt`; `reused` overrides the prefix the scheduler chose to take from cache."""
    seq = Sequence(prompt=prompt, params=None, gbnf=None, seed=0, sink=None)  # type: ignore[arg-type]
    scheduler.waiting.append(seq)
    scheduler.admit()
    if reused is not None:
        seq.n_past = reused
    return seq


def test_prompt_chunks_keep_the_cold_kernels_within_the_budget() -> None:
    """Chunks keep at least 64 rows and never strand fewer than 64 behind (a cold run tiles
    those tokens); a sequence's later chunks in a step stay within the budget."""
    scheduler = Scheduler(slots=2, budget=160)
    seq = _running(scheduler, list(range(300)), reused=100)
    # 200 tokens left, 159 of budget (one kept for the sequence's decode token): 159 would
    # strand 41, so 136 now and 64 next step.
    scheduler.begin_step()
    chunk = scheduler.next_prefill()
    assert chunk is not None and (chunk.start, len(chunk.tokens), chunk.sample) == (100, 136, False)
    seq.n_past = 236  # evaluated
    assert scheduler.decode_tokens() == []  # still prefilling
    assert scheduler.next_prefill() is None  # 64 more would overrun this step's budget
    scheduler.begin_step()
    chunk = scheduler.next_prefill()
    assert chunk is not None and (chunk.start, len(chunk.tokens), chunk.sample) == (236, 64, True)


def _evaluated(scheduler: Scheduler, prompt: list[int]) -> Sequence:
    """Admit `prompt` and mark it fully evaluated (a cold run), ready to be released."""
    seq = _running(scheduler, prompt, reused=0)
    seq.tokens, seq.n_past = list(prompt), len(prompt)
    seq.kernels = bytearray(cold_kernels(len(prompt), scheduler.budget))
    return seq


def _admit(scheduler: Scheduler, prompt: list[int]) -> Admission:
    scheduler.waiting.append(Sequence(prompt=prompt, params=None, gbnf=None, seed=0, sink=None))  # type: ignore[arg-type]
    (admission,) = scheduler.admit()
    return admission


def test_a_new_sequence_takes_the_lowest_free_slot_and_copies_a_longer_prefix() -> None:
    """Running sequences on consecutive slot ids decode in one micro-batch (a scattered set
    costs one per run of ids), so a new sequence always takes the lowest free slot; when
    another slot, free or running, holds a longer reusable prefix, its KV stream is copied."""
    scheduler = Scheduler(slots=4, budget=B, copy_worth=4)
    header = list(range(25))
    system = list(range(1000, 1400))
    first = _evaluated(scheduler, header + [1] * 20)  # slot 0
    second = _evaluated(scheduler, header + [2] * 20)  # slot 1
    third = _evaluated(scheduler, system + [3] * 20)  # slot 2
    assert (first.slot, second.slot, third.slot) == (0, 1, 2)
    scheduler.release(third)
    scheduler.release(second)
    # Slot 1 shares the 25-token header, as running slot 0 does: its own cache, no copy.
    fourth = _admit(scheduler, header + [4] * 20)
    assert (fourth.seq.slot, fourth.reuse, fourth.donor) == (1, 25, None)
    scheduler.release(first)
    # Slot 0 has only the header; free slot 2 holds 400 tokens of the system prompt: copied.
    fifth = _admit(scheduler, system + [5] * 100)
    assert (fifth.seq.slot, fifth.reuse, fifth.donor) == (0, 400, 2)
    assert bytes(fifth.seq.kernels) == cold_kernels(420, B)[:400]
    # Slot 3 never ran: the running fifth sequence (slot 0) is the donor.
    sixth = _admit(scheduler, system + [6] * 100)
    assert (sixth.seq.slot, sixth.reuse) == (2, 400)  # its own leftovers, no copy
    seventh = _admit(scheduler, system + [7] * 100)
    assert (seventh.seq.slot, seventh.reuse, seventh.donor) == (3, 400, 0)


def test_a_copy_must_save_copy_worth_tokens() -> None:
    scheduler = Scheduler(slots=2, budget=B, copy_worth=26)
    header = list(range(25))
    first = _admit(scheduler, header + [1] * 20)
    first.seq.n_past = 45
    first.seq.kernels = bytearray(cold_kernels(45, B))
    second = _admit(scheduler, header + [2] * 20)  # 25 tokens to gain, 26 needed
    assert (second.seq.slot, second.reuse, second.donor) == (1, 0, None)
    assert copy_worth(2048) == 4 and copy_worth(8192) == 16


def test_the_batched_engine_alone_chunks_a_prompt_like_a_cold_run() -> None:
    """Without reuse, `next_chunk` with a full budget reproduces the cold run's micro-batches
    (and so its kernels) for every prompt length."""
    for n_batch in (64, 100, 512):
        for n in range(1, 1100):
            assert planned_kernels(0, n, n_batch) == cold_kernels(n, n_batch), (n_batch, n)


def test_the_reuse_ceiling_is_what_a_perfect_cache_gives() -> None:
    """`reuse_ceiling` (how far the donor scan may stop early) equals the reuse from a cache
    holding the whole prompt, computed the way a cold run does."""
    for n_batch in (64, 100, 512):
        for n in range(1, 700, 7):
            prompt = list(range(n))
            perfect = reusable_prefix(prompt, cold_kernels(n, n_batch), prompt, n_batch)
            assert reuse_ceiling(n, n_batch) == perfect, (n, n_batch)
