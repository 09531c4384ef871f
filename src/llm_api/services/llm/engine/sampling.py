"""Per-sequence llama.cpp sampler chains.

The chain order copies llama-cpp-python's `Llama._init_sampler` (0.3.x): penalties → grammar →
greedy at temperature 0, else top_k → typical → top_p → min_p → temp → dist(seed). Same order and
same parameters means that one sequence decoded alone by the batched engine produces the same
tokens as `Llama.generate` in the one-at-a-time backend, for the same seed.
"""

from __future__ import annotations

import secrets
from typing import Any

import llama_cpp

from llm_api.core.exceptions import InvalidRequestError
from llm_api.services.llm.registry import SamplingDefaults
from llm_api.services.llm.types import SamplingParams

# llama-cpp-python's default `last_n_tokens_size`: the window the penalties look back over.
PENALTY_LAST_N = 64
GRAMMAR_ROOT = b"root"


def request_seed(params: SamplingParams) -> int:
    """The seed the dist sampler gets: the request's (as llama.cpp's uint32), or a fresh random
    one, so that unseeded requests are not correlated with each other."""
    seed = params.seed if params.seed is not None else secrets.randbits(32)
    return seed & 0xFFFFFFFF


def grammar_sampler(vocab: Any, gbnf: str) -> Any:
    """A grammar sampler, or 400 when llama.cpp cannot parse the grammar (it returns NULL)."""
    smpl = llama_cpp.llama_sampler_init_grammar(vocab, gbnf.encode("utf-8"), GRAMMAR_ROOT)
    if not smpl:
        raise InvalidRequestError(
            "response_format.json_schema produced an invalid grammar.", param="response_format"
        )
    return smpl


def check_grammar(vocab: Any, gbnf: str) -> None:
    llama_cpp.llama_sampler_free(grammar_sampler(vocab, gbnf))


def build_chain(
    params: SamplingParams,
    defaults: SamplingDefaults,
    *,
    vocab: Any,
    n_vocab: int,
    gbnf: str | None,
    seed: int,
) -> Any:
    """A new sampler chain; the caller frees it with `llama_sampler_free`."""
    chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
    add = llama_cpp.llama_sampler_chain_add
    add(
        chain,
        llama_cpp.llama_sampler_init_penalties(
            n_vocab,
            PENALTY_LAST_N,
            defaults.repeat_penalty,
            params.frequency_penalty,
            params.presence_penalty,
        ),
    )
    if gbnf is not None:
        try:
            add(chain, grammar_sampler(vocab, gbnf))
        except InvalidRequestError:
            llama_cpp.llama_sampler_free(chain)
            raise
    if params.temperature == 0.0:
        add(chain, llama_cpp.llama_sampler_init_greedy())
        return chain
    add(chain, llama_cpp.llama_sampler_init_top_k(defaults.top_k))
    add(chain, llama_cpp.llama_sampler_init_typical(1.0, 1))
    add(chain, llama_cpp.llama_sampler_init_top_p(params.top_p, 1))
    add(chain, llama_cpp.llama_sampler_init_min_p(defaults.min_p, 1))
    add(chain, llama_cpp.llama_sampler_init_temp(params.temperature))
    add(chain, llama_cpp.llama_sampler_init_dist(seed))
    return chain
