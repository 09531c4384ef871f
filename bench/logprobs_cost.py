"""What logprobs cost the batched engine, in process (no HTTP).

    .venv/bin/python -m bench.logprobs_cost [--streams 8] [--max-tokens 64] [--repeats 5]

1. Aggregate output tokens/s of `--streams` concurrent streams through `LlamaBatchedBackend`
   (the built-in SmolLM2 entry), each mode in turn, interleaved over `--repeats` rounds so that
   load from elsewhere on the machine spreads over all of them: logprobs off; logprobs with
   top_logprobs 0; logprobs with top_logprobs 20. Same prompts, temperature 0, fixed
   max_tokens, EOS not ignored (the completion tokens actually produced are counted).
   Tokens/s = completion tokens of all streams / wall time from submit to the last frame;
   CPU µs/token = the process's CPU time over the round / those tokens. With `--threads 1`
   llama.cpp has no worker threads spin-waiting, so CPU per token depends little on other
   load on the machine, where tokens/s does.
2. The reader alone: CPU microseconds per token for one logits row (the real model's, after
   a prompt), per top_logprobs, as the engine thread spends them (thread CPU time, best of 3).

Run with PYTHONPATH pointing at another tree's `src` to measure that tree (e.g. the commit
before logprobs existed) with mode "off" only: `--modes off`.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
import timeit
from typing import Any

from llm_api.core.cpus import available_cpus
from llm_api.services.llm.backends.llama_batched import LlamaBatchedBackend
from llm_api.services.llm.registry import DEFAULT_MODEL_ID, builtin_registry
from llm_api.services.llm.types import GenerationRequest, Message, SamplingParams

PROMPTS = [
    "Write a long, detailed story about a lighthouse keeper and a storm.",
    "Explain in detail how a compiler turns source code into machine code.",
    "Describe a week-long hiking trip through the mountains, day by day.",
    "Write a long letter from a sailor to his family about life at sea.",
]
MODES = {"off": (False, 0), "top0": (True, 0), "top20": (True, 20)}


def _request(i: int, mode: str, max_tokens: int) -> GenerationRequest:
    logprobs, top = MODES[mode]
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, top_p=1.0)
    if logprobs:  # set only when asked, so this runs on trees without these fields too
        params.logprobs, params.top_logprobs = True, top
    return GenerationRequest(
        request_id=f"bench-{i}",
        model=DEFAULT_MODEL_ID,
        params=params,
        messages=[Message("user", PROMPTS[i % len(PROMPTS)])],
    )


async def _one(backend: LlamaBatchedBackend, req: GenerationRequest) -> int:
    await backend.prepare(req)
    n = 0
    async for frame in backend.generate(req):
        if frame.finish_reason is not None:
            n = frame.completion_tokens or 0
    return n


async def _round(
    backend: LlamaBatchedBackend, mode: str, streams: int, max_tokens: int
) -> tuple[float, float]:
    """Tokens/s (wall) and CPU µs per token (the whole process) for one round."""
    reqs = [_request(i, mode, max_tokens) for i in range(streams)]
    start, cpu = time.perf_counter(), time.process_time()
    counts = await asyncio.gather(*(_one(backend, r) for r in reqs))
    n = sum(counts)
    return n / (time.perf_counter() - start), (time.process_time() - cpu) / n * 1e6


def _reader_cost(backend: LlamaBatchedBackend) -> dict[int, float]:
    """µs per token of LogprobReader on a real logits row (after evaluating one prompt)."""
    import llama_cpp
    import numpy as np

    from llm_api.services.llm.engine.logprobs import LogprobReader

    engine = backend.engine
    assert engine is not None
    ctx, n_vocab = engine._ctx, engine._n_vocab
    row = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, -1), shape=(n_vocab,))
    logits = row.copy()
    reader = LogprobReader(n_vocab, engine._detokenize)
    token = int(logits.argmax())
    out = {}
    for top in (0, 5, 20):
        reader.from_logits(logits, token, top)  # fill the token-text cache

        def call(top: int = top) -> None:
            reader.from_logits(logits, token, top)

        # This thread's CPU time, not wall time: other load on the machine would dominate.
        timer = timeit.Timer(call, time.thread_time)
        out[top] = min(timer.repeat(repeat=3, number=2000)) / 2000 * 1e6
    return out


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--streams", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--threads", type=int, default=available_cpus())
    args = ap.parse_args()
    modes = args.modes.split(",")
    config = builtin_registry().models[0].model_copy(update={"prefix_cache": False})
    backend = LlamaBatchedBackend(config, threads=args.threads)
    await backend.start(warmup=True)
    try:
        for mode in modes:  # warm-up round each
            await _round(backend, mode, args.streams, args.max_tokens)
        results: dict[str, list[tuple[float, float]]] = {m: [] for m in modes}
        for _ in range(args.repeats):
            for mode in modes:
                results[mode].append(await _round(backend, mode, args.streams, args.max_tokens))
        print(f"{args.streams} streams × {args.max_tokens} tokens, {args.threads} threads")
        print("mode    tok/s: median   min    max | CPU µs/token: median   min    max | runs")
        for mode, values in results.items():
            if not values:
                continue
            rate, cpu = [v[0] for v in values], [v[1] for v in values]
            print(
                f"{mode:6} {statistics.median(rate):14.1f} {min(rate):6.1f} {max(rate):6.1f}"
                f" | {statistics.median(cpu):19.0f} {min(cpu):6.0f} {max(cpu):6.0f}"
                f" | {len(values)}"
            )
        if "top0" in modes or args.repeats == 0:
            cost: dict[Any, float] = _reader_cost(backend)
            print("reader µs/token: " + ", ".join(f"top {k}: {v:.1f}" for k, v in cost.items()))
    finally:
        await backend.aclose()


if __name__ == "__main__":
    asyncio.run(main())
