"""How prompts are cut into chunks, and which cached KV entries can be reused without
changing a single logit.

llama.cpp's CPU backend picks a flash-attention kernel per micro-batch (ggml-cpu `ops.cpp`,
`ggml_compute_forward_flash_attn_ext_f16`):
- a "tiled" kernel (Q in F32) when a sequence has at least `GGML_FA_TILE_Q` = 64 rows in the
  micro-batch;
- a split-KV kernel (partial sums per thread) for a single row of a single sequence once the
  KV view has 512 cells or more (the view is padded to 256, so from position 256 on);
- otherwise a per-row kernel (Q in F16).
Each is exact per row whatever the number of rows, but they round differently, so a token's
K/V, and the last prompt token's logits, depend on which kernel computed it. The matrix
products are per-row exact.

A cold run (the one-at-a-time engine, or the batched engine without reuse) evaluates a prompt
in micro-batches of `n_batch` tokens from position 0. The batched engine evaluates each prompt
chunk alone in its own llama_decode (one micro-batch, since a chunk is at most `n_batch`), cuts
chunks so that they take the same kernels as the cold run wherever it can (`next_chunk`), and
records, per cached token, the kernel that computed it. A new prompt reuses a cached prefix
only as far as those records match what a cold run would do, and only from a point where the
rest can be evaluated with the cold run's kernels too (`reusable_prefix`). Reuse then never
changes an answer (tests/test_batching.py checks them against the one-at-a-time engine).
"""

from __future__ import annotations

from functools import lru_cache

MIN_TILED = 64  # GGML_FA_TILE_Q: from this many rows of one sequence, the tiled kernel
_SPLIT_KV_FROM = 256  # first position whose KV view (padded to 256) reaches 512 cells

TILED, ROWWISE, SPLIT, DECODED = b"T", b"R", b"X", b"D"


def chunk_kernels(start: int, end: int) -> bytes:
    """The kernel for each of tokens start..end-1, evaluated as one micro-batch."""
    rows = end - start
    if rows >= MIN_TILED:
        kernel = TILED
    elif rows == 1 and start >= _SPLIT_KV_FROM:
        kernel = SPLIT
    else:
        kernel = ROWWISE
    return kernel * rows


def decode_kernel(pos: int) -> bytes:
    """A sampled token evaluated in a decode step. Below position 256 it is the per-row kernel
    whatever else is in the batch; beyond, a lone sequence takes the split-KV kernel, which a
    cold prompt evaluation never does for a token that is not last, so it is never reused."""
    return ROWWISE if pos < _SPLIT_KV_FROM else DECODED


def _short_tail(n: int, n_batch: int) -> int:
    """Where a cold run's last micro-batch starts if it has fewer than MIN_TILED rows (it then
    takes the per-row kernel, and so must the batched engine), else n."""
    last = n - (n - 1) // n_batch * n_batch  # rows in the cold run's last micro-batch
    return n - last if last < MIN_TILED else n


def next_chunk(pos: int, n: int, left: int, n_batch: int) -> int:
    """End of the next prompt chunk from `pos` (prompt length n) with `left` tokens of this
    step's budget. Chunks before a cold run's short tail keep at least MIN_TILED rows and never
    leave fewer behind (so they are tiled, as in the cold run); the short tail is one chunk.
    May overrun `left` (by less than 2 × MIN_TILED) to keep those rules."""
    tail = _short_tail(n, n_batch)
    if pos >= tail:
        return n
    rest, room = tail - pos, min(left, n_batch)
    if rest <= room:
        return tail
    take = min(n_batch, max(MIN_TILED, room))
    if rest - take < MIN_TILED:  # do not strand a remainder that would not be tiled
        take = rest - MIN_TILED if rest - MIN_TILED >= MIN_TILED else min(rest, n_batch)
    return pos + take


def planned_kernels(start: int, n: int, n_batch: int) -> bytes:
    """Kernels for tokens start..n-1 evaluated alone with a full budget each step."""
    out = bytearray()
    pos = start
    while pos < n:
        end = next_chunk(pos, n, n_batch, n_batch)
        out += chunk_kernels(pos, end)
        pos = end
    return bytes(out)


@lru_cache(maxsize=64)  # admission asks once per free slot for the same prompt length
def cold_kernels(n: int, n_batch: int) -> bytes:
    """What a cold evaluation of an n-token prompt does: micro-batches of n_batch from 0."""
    out = bytearray()
    for a in range(0, n, n_batch):
        out += chunk_kernels(a, min(a + n_batch, n))
    return bytes(out)


def reusable_prefix(
    cached: list[int], kernels: bytes | bytearray, prompt: list[int], n_batch: int
) -> int:
    """How many leading tokens of `prompt` can be taken from a KV cache holding the first
    `len(kernels)` tokens of `cached` (computed by `kernels`) so that the evaluation
    reproduces a cold one bit for bit. (`cached` may run on: a sequence's sampled tokens
    not yet in its KV cache.)"""
    n = len(prompt)
    cold = cold_kernels(n, n_batch)
    # The last prompt token is always evaluated: its logits are needed.
    limit = min(len(kernels), n - 1)
    p = 0
    while p < limit and cached[p] == prompt[p] and kernels[p] == cold[p]:
        p += 1
    return _back_off(p, n, n_batch)


@lru_cache(maxsize=64)
def reuse_ceiling(n: int, n_batch: int) -> int:
    """The most `reusable_prefix` can give an n-token prompt, whatever the cache holds."""
    return _back_off(n - 1, n, n_batch)


def _back_off(p: int, n: int, n_batch: int) -> int:
    """Back off from p until the rest, evaluated from there, takes the cold run's kernels (at
    p = 0 it is the cold run)."""
    cold = cold_kernels(n, n_batch)
    while p > 0 and planned_kernels(p, n, n_batch) != cold[p:]:
        p -= 1
    return p
