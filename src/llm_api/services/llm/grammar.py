"""JSON schemas → llama.cpp grammars, so constrained output always parses and matches."""

from __future__ import annotations

import hashlib
import json
from functools import lru_cache
from typing import Any

from llama_cpp.llama_grammar import JSON_GBNF, LlamaGrammar

from llm_api.core.exceptions import InvalidRequestError


def schema_key(schema: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(schema, sort_keys=True).encode()).hexdigest()


@lru_cache(maxsize=128)
def _gbnf_for(key: str, schema_json: str) -> str:
    # lru_cache holds plain strings here (not coroutines, not per-request objects); a grammar
    # object is built fresh per request because it carries parse state.
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    return str(json_schema_to_gbnf(schema_json))


def gbnf_for_schema(schema: dict[str, Any]) -> str:
    """{} means json_object: any JSON object. Raises 400 for schemas we cannot compile."""
    if not schema:
        return JSON_GBNF
    try:
        return _gbnf_for(schema_key(schema), json.dumps(schema))
    except (ValueError, KeyError, TypeError, NotImplementedError, RecursionError) as exc:
        raise InvalidRequestError(
            f"response_format.json_schema could not be compiled: {type(exc).__name__}",
            param="response_format",
        ) from None


def build_grammar(gbnf: str) -> LlamaGrammar:
    try:
        return LlamaGrammar.from_string(gbnf, verbose=False)
    except ValueError:
        raise InvalidRequestError(
            "response_format.json_schema produced an invalid grammar.", param="response_format"
        ) from None
