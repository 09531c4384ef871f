"""Why prefix reuse is cut the way engine/exact_reuse.py cuts it, measured on llama.cpp directly.

1. Exactness: evaluate a prompt cold (one llama_decode from position 0), and again as "a prefix
   computed by an earlier, different prompt + the rest", and compare the last token's logits
   bit for bit. `exact_reuse.reusable_prefix` predicts which reuse points are exact; each case
   prints the prediction next to what llama.cpp did.
2. Cost of the alternative (64-token micro-batches everywhere, which would make any aligned
   reuse exact): prefill tokens/s at micro-batch 64 vs 512, interleaved repeats.

    .venv/bin/python -m bench.prefix_exactness
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import llama_cpp
import numpy as np

from llm_api.services.llm.engine.exact_reuse import chunk_kernels, cold_kernels, reusable_prefix
from llm_api.services.llm.registry import builtin_registry

N_BATCH = 512


class Context:
    def __init__(self, model: Any, n_vocab: int, n_ubatch: int, threads: int) -> None:
        params = llama_cpp.llama_context_default_params()
        params.n_ctx, params.n_batch, params.n_ubatch = 4 * 2048, N_BATCH, n_ubatch
        params.n_seq_max, params.kv_unified = 4, False  # as the batched engine
        params.n_threads = params.n_threads_batch = threads
        params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED
        self.ctx = llama_cpp.llama_init_from_model(model, params)
        self.mem = llama_cpp.llama_get_memory(self.ctx)
        self.batch = llama_cpp.llama_batch_init(N_BATCH, 0, 1)
        self.n_vocab = n_vocab

    def evaluate(self, seq: int, tokens: list[int], start: int) -> np.ndarray:
        """tokens[start:] in one llama_decode (at most N_BATCH); the last token's logits."""
        b = self.batch
        for i, t in enumerate(tokens[start:]):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = t, start + i, 1, 0
            b.seq_id[i][0] = seq
        b.n_tokens = len(tokens) - start
        b.logits[b.n_tokens - 1] = 1
        assert llama_cpp.llama_decode(self.ctx, b) == 0
        logits = llama_cpp.llama_get_logits_ith(self.ctx, b.n_tokens - 1)
        return np.ctypeslib.as_array(logits, shape=(self.n_vocab,)).copy()


def exactness(ctx: Context, rng: np.random.Generator) -> None:
    def tokens(n: int) -> list[int]:
        return [int(x) for x in rng.integers(100, 40000, n)]

    print("| prompt | shared | reuse at | predicted exact | exact | max abs diff | engine reuses |")
    print("|---|---|---|---|---|---|---|")
    for n, shared, old_len, reuse in [
        (60, 25, 55, 25),  # short prompt: per-row kernel everywhere
        (60, 59, 62, 59),
        (320, 300, 315, 300),  # the rest would be 20 rows, per-row; cold tiles them
        (320, 300, 315, 256),  # the rest is 64 rows: tiled, as cold
        (400, 300, 315, 300),
        (300, 290, 310, 236),
        (200, 150, 160, 100),
    ]:
        prompt = tokens(n)
        old = prompt[:shared] + tokens(old_len - shared)
        llama_cpp.llama_memory_clear(ctx.mem, True)
        cold = ctx.evaluate(0, prompt, 0)
        ctx.evaluate(1, old, 0)
        llama_cpp.llama_memory_seq_rm(ctx.mem, 1, reuse, -1)
        warm = ctx.evaluate(1, prompt, reuse)
        # Exact iff every token takes the cold run's kernel: the cached ones (computed by the
        # old prompt's cold run) and the rest (one micro-batch from `reuse`).
        want = cold_kernels(n, N_BATCH)
        got = cold_kernels(old_len, N_BATCH)[:reuse] + chunk_kernels(reuse, n)
        predicted = got == want
        engine = reusable_prefix(old, cold_kernels(old_len, N_BATCH), prompt, N_BATCH)
        same = bool(np.array_equal(cold, warm))
        diff = float(np.max(np.abs(cold - warm)))
        print(f"| {n} | {shared} | {reuse} | {predicted} | {same} | {diff:.4f} | {engine} |")


def prefill_speed(model: Any, n_vocab: int, threads: int, lengths: list[int]) -> None:
    ctxs = {ub: Context(model, n_vocab, ub, threads) for ub in (64, 512)}
    rng = np.random.default_rng(1)
    print("\n| prompt tokens | tok/s, micro-batch 64 | tok/s, micro-batch 512 | ratio |")
    print("|---|---|---|---|")
    for n in lengths:
        prompt = [int(x) for x in rng.integers(100, 40000, n)]
        rates: dict[int, list[float]] = {ub: [] for ub in ctxs}
        for _ in range(5):
            for ub, c in ctxs.items():
                llama_cpp.llama_memory_clear(c.mem, True)
                t = time.perf_counter()
                for a in range(0, n, N_BATCH):
                    c.evaluate(0, prompt[: min(a + N_BATCH, n)], a)
                rates[ub].append(n / (time.perf_counter() - t))
        m64, m512 = statistics.median(rates[64]), statistics.median(rates[512])
        print(f"| {n} | {m64:.0f} | {m512:.0f} | {m64 / m512:.2f} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--lengths", default="200,512,1024", help="prompt lengths for the speed part")
    args = p.parse_args()
    llama_cpp.llama_backend_init()
    path = builtin_registry().models[0].gguf_path()
    model = llama_cpp.llama_model_load_from_file(
        str(path).encode(), llama_cpp.llama_model_default_params()
    )
    n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(model))
    exactness(Context(model, n_vocab, N_BATCH, args.threads), np.random.default_rng(0))
    prefill_speed(model, n_vocab, args.threads, [int(x) for x in args.lengths.split(",")])


if __name__ == "__main__":
    main()
