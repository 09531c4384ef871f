"""Which cached KV entries can be reused without changing a single logit.

llama.cpp's CPU backend picks a flash-attention kernel per micro-batch (ggml-cpu `ops.cpp`,
`ggml_compute_forward_flash_attn_ext_f16`):
- a "tiled" kernel (Q in F32) when a sequence has at least `GGML_FA_TILE_Q` = 64 rows in the
  micro-batch;
- a split-KV kernel (partial sums per thread) for a single row of a single sequence once the
  KV view has 512 cells or more (the view is padded to 256, so from position 256 on);
- otherwise a per-row kernel (Q in F16).
Each is exact per row but they round differently, so a token's K/V, and the logits of the last
prompt token, depend on which kernel computed it. The matrix products are per-row exact.

So a prompt evaluated as "cached prefix + rest" gives the same logits as a cold evaluation
exactly when every token is computed by the same kernel in both. Both engines therefore split
prompts into micro-batches of `UBATCH` = 64 tokens aligned to absolute positions (the
one-at-a-time engine from position 0, by its `n_ubatch`; the batched engine by ending each
prompt chunk on a 64-token boundary). A cold run's kernels are then a function of the prompt
length alone, and each cached token carries a one-letter record of the kernel that computed it,
so reuse stops at the first token whose record differs from what a cold run would do. This is
block-granular reuse, like vLLM's prefix caching of full KV blocks.
"""

from __future__ import annotations

UBATCH = 64  # = GGML_FA_TILE_Q: a full aligned micro-batch always takes the tiled kernel
_SPLIT_KV_FROM = 256  # first position whose KV view (padded to 256) reaches 512 cells

TILED, ROWWISE, SPLIT, DECODED = b"T", b"R", b"X", b"D"


def _rows_kernel(rows: int, last_pos: int) -> bytes:
    if rows >= UBATCH:
        return TILED
    if rows == 1 and last_pos >= _SPLIT_KV_FROM:
        return SPLIT
    return ROWWISE


def prefill_kernels(start: int, end: int) -> bytes:
    """Kernels for tokens start..end-1 evaluated alone in one llama_decode, which llama.cpp
    splits into micro-batches of `UBATCH` tokens from `start`."""
    out = bytearray()
    for a in range(start, end, UBATCH):
        b = min(a + UBATCH, end)
        out += _rows_kernel(b - a, b - 1) * (b - a)
    return bytes(out)


def decode_kernel(pos: int) -> bytes:
    """A sampled token evaluated in a decode step. Below position 256 it is the per-row kernel
    whatever else is in the batch; beyond, a lone sequence takes the split-KV kernel, which a
    cold prompt evaluation never does for a token that is not last, so it is never reused."""
    return ROWWISE if pos < _SPLIT_KV_FROM else DECODED


def cold_kernels(n: int) -> bytes:
    """What a cold evaluation of an n-token prompt does (aligned micro-batches from 0)."""
    return prefill_kernels(0, n)


def next_boundary(pos: int) -> int:
    return (pos // UBATCH + 1) * UBATCH


def reusable_prefix(cached: list[int], kernels: bytes, prompt: list[int]) -> int:
    """How many leading tokens of `prompt` can be taken from a KV cache holding `cached`
    (computed by `kernels`) so that evaluating the rest, from there to the next 64-token
    boundary and then in aligned blocks, reproduces a cold evaluation bit for bit."""
    n = len(prompt)
    cold = cold_kernels(n)
    limit = min(len(cached), n - 1)  # the last prompt token is always evaluated: its logits
    p = 0
    while p < limit and cached[p] == prompt[p] and kernels[p] == cold[p]:
        p += 1
    # Only the first evaluated block can differ from a cold run: it starts at p instead of at
    # its boundary. Step back until its rows take the same kernel as the cold block's (at the
    # latest at the boundary itself, where the two blocks are the same).
    while p % UBATCH:
        end = min(next_boundary(p), n)
        if prefill_kernels(p, end) == cold[p:end]:
            break
        p -= 1
    return p
