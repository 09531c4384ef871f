"""Log-probabilities of sampled tokens, in OpenAI's shape, from the logits llama.cpp leaves.

What is reported is the model's own distribution at that step: log-softmax of the raw logits
of the output row the token was sampled from, before temperature, penalties, top-k/p, min-p or
a grammar (vLLM's default `raw_logprobs`; OpenAI's values do not change with temperature
either). So the numbers describe the model, not the sampler's reshaping of it, and they are
the same for a request whatever its sampling settings; a grammar may pick a token the model
rates low, and its logprob says so.

Each entry is one model token. `token` is its text; a token that is not valid UTF-8 on its own
(a piece of a multi-byte character) shows its undecodable bytes as `\\xNN`, as OpenAI does,
and `bytes` always has the exact bytes, so concatenating `bytes` over a stream rebuilds the
output.

Cost: only sequences that ask pay it: a few passes over the vocabulary (max, exp, sum; block
maxima for top_logprobs) and a sort of a few candidates, a few numpy calls per token.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import cache
from typing import Any

import llama_cpp
import numpy as np

from llm_api.services.llm.types import TokenLogprob, TopLogprob

MAX_TOP_LOGPROBS = 20  # OpenAI's bound on top_logprobs
_BLOCK = 256  # logits per block in the top-k search (`LogprobReader._top`)


class LogprobReader:
    """Reads one output row's logits (`llama_get_logits_ith`) into a `TokenLogprob`.

    Holds scratch buffers: one reader per thread (the engine thread that owns the context),
    used before that context's next `llama_decode`."""

    def __init__(self, n_vocab: int, token_bytes: Callable[[int], bytes]) -> None:
        self._n_vocab = n_vocab
        n_blocks = -(-n_vocab // _BLOCK)
        self._work = np.empty(n_vocab, dtype=np.float32)
        # The logits in blocks of _BLOCK, padded with -inf (never among the top ones).
        self._blocks = np.full((n_blocks, _BLOCK), -np.inf, dtype=np.float32)
        self._block_ids = np.arange(_BLOCK)

        @cache  # the vocabulary is finite and fixed
        def piece(token: int) -> tuple[str, tuple[int, ...]]:
            raw = token_bytes(token)
            return raw.decode("utf-8", "backslashreplace"), tuple(raw)

        self._piece = piece

    def read(self, ctx: Any, idx: int, token: int, top: int) -> TokenLogprob:
        """The logprob of `token` sampled from output row `idx` (negative: from the end),
        with the `top` most likely tokens of that row, most likely first."""
        ptr = llama_cpp.llama_get_logits_ith(ctx, idx)
        logits = np.ctypeslib.as_array(ptr, shape=(self._n_vocab,))  # a view, no copy
        return self.from_logits(logits, token, top)

    def from_logits(self, logits: np.ndarray[Any, Any], token: int, top: int) -> TokenLogprob:
        peak = logits.max()
        # log-sum-exp, shifted by the peak, in place in a scratch buffer; the float32 sum is
        # numpy's pairwise one (relative error ~1e-7 here, far below what clients read).
        work = self._work
        np.subtract(logits, peak, out=work)
        np.exp(work, out=work)
        lse = float(peak) + math.log(float(work.sum()))
        text, raw = self._piece(token)
        entry = TokenLogprob(text, float(logits[token]) - lse, list(raw))
        k = min(top, MAX_TOP_LOGPROBS, self._n_vocab)
        if k > 0:
            alts = entry.top_logprobs
            for t, value in self._top(logits, k):
                alt_text, alt_raw = self._piece(t)
                alts.append(TopLogprob(alt_text, value - lse, list(alt_raw)))
        return entry

    def _top(self, logits: np.ndarray[Any, Any], k: int) -> list[tuple[int, float]]:
        """The k largest logits with their token ids, largest first, equal ones by id.

        A full `argpartition` over the vocabulary costs ~10 times more. Instead: the k-th
        largest block maximum is at most the k-th largest logit (the k largest block maxima
        are k distinct logits), so every one of the top k is at least that and lies in one
        of the (at most k, ties aside) blocks whose maximum reaches it."""
        blocks = self._blocks
        blocks.reshape(-1)[: self._n_vocab] = logits
        maxima = blocks.max(axis=1)
        n_blocks = len(maxima)
        # (A vocabulary of fewer than k blocks: every token is a candidate.)
        floor = np.partition(maxima, n_blocks - k)[n_blocks - k] if k < n_blocks else -np.inf
        rows = np.flatnonzero(maxima >= floor)
        ids = (rows[:, None] * _BLOCK + self._block_ids).ravel()
        values = blocks.reshape(-1)[ids]
        keep = values >= floor
        ids, values = ids[keep], values[keep]
        order = np.lexsort((ids, -values))[:k]
        return list(zip(ids[order].tolist(), values[order].tolist(), strict=True))
