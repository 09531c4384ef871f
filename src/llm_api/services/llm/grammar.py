"""JSON schemas → llama.cpp grammars, so constrained output always parses and matches."""

from __future__ import annotations

import hashlib
import json
from functools import lru_cache
from typing import Any

from llama_cpp.llama_grammar import JSON_GBNF, LlamaGrammar

from llm_api.core.exceptions import InvalidRequestError

# A schema such as {"type": "string", "maxLength": 100000} compiles to a grammar of ~800 kB that
# makes every sampling step slow; real response schemas compile to a few kB.
MAX_GRAMMAR_CHARS = 128_000


def schema_key(schema: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(schema, sort_keys=True).encode()).hexdigest()


def _reject_remote_refs(node: Any) -> None:
    """llama-cpp-python's converter fetches `$ref: "https://..."` with requests.get (SSRF from a
    request body); only local refs (`#/...`) are allowed."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref" and not (isinstance(value, str) and value.startswith("#")):
                raise InvalidRequestError(
                    "response_format.json_schema may only use local `$ref`s (`#/...`).",
                    param="response_format",
                )
            _reject_remote_refs(value)
    elif isinstance(node, list):
        for value in node:
            _reject_remote_refs(value)


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
    _reject_remote_refs(schema)
    try:
        gbnf = _gbnf_for(schema_key(schema), json.dumps(schema))
    except Exception as exc:  # the converter asserts and raises assorted errors on bad schemas
        raise InvalidRequestError(
            f"response_format.json_schema could not be compiled: {type(exc).__name__}",
            param="response_format",
        ) from None
    if len(gbnf) > MAX_GRAMMAR_CHARS:
        raise InvalidRequestError(
            "response_format.json_schema is too complex (its grammar exceeds "
            f"{MAX_GRAMMAR_CHARS} characters); lower its length and item bounds.",
            param="response_format",
        )
    return gbnf


def build_grammar(gbnf: str) -> LlamaGrammar:
    try:
        return LlamaGrammar.from_string(gbnf, verbose=False)
    except ValueError:
        raise InvalidRequestError(
            "response_format.json_schema produced an invalid grammar.", param="response_format"
        ) from None
