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

Cost: only sequences that ask pay it; one pass over the vocabulary (max, exp-sum) and, for
top_logprobs, one partial sort: tens of microseconds per token for SmolLM2's 49,152 entries.
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


class LogprobReader:
    """Reads one output row's logits (`llama_get_logits_ith`) into a `TokenLogprob`.
    Use on the thread that owns the context, before its next `llama_decode`."""

    def __init__(self, n_vocab: int, token_bytes: Callable[[int], bytes]) -> None:
        self._n_vocab = n_vocab

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
        # log-sum-exp, shifted by the peak; summed in float64 so the total is exact enough
        # that the logprobs of a whole distribution add up to 1 within float rounding.
        lse = float(peak) + math.log(float(np.exp(logits - peak).sum(dtype=np.float64)))
        text, raw = self._piece(token)
        entry = TokenLogprob(text, float(logits[token]) - lse, list(raw))
        k = min(top, MAX_TOP_LOGPROBS, self._n_vocab)
        if k > 0:
            ids = np.argpartition(logits, self._n_vocab - k)[self._n_vocab - k :]
            # Most likely first, equal logits by token id (argpartition's choice among ties
            # at the k-th place is arbitrary but fixed for given logits).
            ids = ids[np.lexsort((ids, -logits[ids]))]
            alts = entry.top_logprobs
            for t, value in zip(ids.tolist(), logits[ids].tolist(), strict=True):
                alt_text, alt_raw = self._piece(t)
                alts.append(TopLogprob(alt_text, value - lse, list(alt_raw)))
        return entry
