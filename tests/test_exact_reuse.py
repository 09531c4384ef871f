"""The rule for reusing cached KV without changing output (engine/exact_reuse.py), as pure
functions; tests/test_batching.py checks the outputs themselves against a cold run."""

from __future__ import annotations

from llm_api.services.llm.engine.exact_reuse import (
    cold_kernels,
    decode_kernel,
    prefill_kernels,
    reusable_prefix,
)
from llm_api.services.llm.engine.scheduler import Scheduler
from llm_api.services.llm.engine.sequence import Sequence


def test_cold_kernels_follow_the_micro_batch_shape() -> None:
    assert cold_kernels(60) == b"R" * 60  # one short micro-batch: the per-row kernel
    assert cold_kernels(130) == b"T" * 128 + b"R" * 2  # two full tiles, then a short rest
    assert cold_kernels(257) == b"T" * 256 + b"X"  # a lone last row past 256: split-KV kernel
    assert cold_kernels(65) == b"T" * 64 + b"R"  # a lone row below 256 is still per-row
    assert prefill_kernels(30, 64) == b"R" * 34  # a reused prefix's block finished alone
    assert decode_kernel(10) == b"R" and decode_kernel(300) == b"D"


def test_a_short_prompt_reuses_its_whole_shared_prefix() -> None:
    header = list(range(25))
    old, new = header + [900] * 30, header + [901] * 35
    assert reusable_prefix(old, cold_kernels(len(old)), new) == 25


def test_reuse_stops_where_the_cached_kernel_differs_from_a_cold_run() -> None:
    system = list(range(300))
    old = system + [900] * 15  # 315 tokens: blocks 0-3 tiled, block 4 (59 rows) per-row
    new = system + [901] * 20  # 320 tokens: all five blocks tiled in a cold run
    assert reusable_prefix(old, cold_kernels(len(old)), new) == 256
    # Same prompt lengths, but the cache was filled by a prompt of 40 tokens: per-row kernels
    # where a cold run of the new prompt tiles, so nothing is reused.
    short = system[:40]
    assert reusable_prefix(short, cold_kernels(40), new) == 0


def test_reuse_backs_off_to_keep_the_first_evaluated_block_like_a_cold_run() -> None:
    prompt = list(range(100))  # cold: a tile, then 36 rows per-row
    cached = prompt[:90] + [7]
    kernels = cold_kernels(64) + prefill_kernels(64, 91)
    assert reusable_prefix(cached, kernels, prompt) == 90
    # Within the tiled block, any reuse would evaluate fewer than 64 rows: back to its start.
    long = list(range(200))
    assert reusable_prefix(long[:150], cold_kernels(150), long) == 128
    # Never the whole prompt: the last token is evaluated for the first sampled token.
    assert reusable_prefix(prompt, cold_kernels(100), prompt) == 99


def test_generated_tokens_are_reused_only_where_a_prompt_would_compute_them_alike() -> None:
    turn = list(range(40))
    answer = [500 + i for i in range(10)]
    kernels = cold_kernels(40) + b"".join(decode_kernel(40 + i) for i in range(10))
    follow_up = turn + answer + [9] * 5  # 55 tokens: per-row in a cold run, like the decode
    assert reusable_prefix(turn + answer, kernels, follow_up) == 50
    longer = turn + answer + [9] * 30  # 80 tokens: a cold run tiles the first 64
    assert reusable_prefix(turn + answer, kernels, longer) == 0


def _running(scheduler: Scheduler, prompt: list[int], reused: int) -> Sequence:
    seq = Sequence(prompt=prompt, params=None, gbnf=None, seed=0, sink=None)  # type: ignore[arg-type]
    scheduler.waiting.append(seq)
    scheduler.admit()
    seq.n_past = reused  # as if `reused` tokens came from the slot's cache
    return seq


def test_prompt_chunks_end_on_block_boundaries() -> None:
    """After a reuse that ends inside a block, the first chunk finishes that block; later
    chunks are whole blocks (or the prompt's end) within the step's budget."""
    scheduler = Scheduler(slots=2, budget=160)
    seq = _running(scheduler, list(range(300)), reused=100)
    decodes, prefills = scheduler.plan()
    assert decodes == []
    assert [(w.start, w.start + len(w.tokens), w.sample) for w in prefills] == [
        (100, 128, False),  # finish the block the reused prefix ended in
        (128, 256, False),  # then whole blocks: 160 - 28 leaves room for two
    ]
    seq.n_past = 256
    _, prefills = scheduler.plan()
    assert [(w.start, w.start + len(w.tokens), w.sample) for w in prefills] == [
        (256, 300, True)  # the rest fits the budget: to the prompt's end, first token sampled
    ]
