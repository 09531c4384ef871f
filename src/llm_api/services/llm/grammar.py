"""JSON schemas → llama.cpp grammars, so constrained output always parses and matches.

llama-cpp-python's converter expands every count in a schema (`maxLength`, `minLength`,
`minItems`, `maxItems`, `{m,n}` in a `pattern`) into that many copies of a rule: a 60-byte
schema with `"maxLength": 25000000` builds a ~200 MB string. So every count is bounded before
conversion (`check_schema_bounds`), and the conversion itself runs on a budget
(`_BoundedConverter`): each expansion is charged before it is built, the grammar's size as it
grows, and the converter's steps (visits, optional-property chains, rule-name clashes), which
are quadratic in places. Only grammars that pass are cached, in an LRU bounded in characters.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from typing import Any

from cachetools import LRUCache
from llama_cpp.llama_grammar import (
    INVALID_RULE_CHARS_RE,
    JSON_GBNF,
    LlamaGrammar,
    SchemaConverter,
)

from llm_api.core.exceptions import InvalidRequestError

# A schema such as {"type": "string", "maxLength": 100000} compiles to a grammar of ~800 kB that
# makes every sampling step slow; real response schemas compile to a few kB.
MAX_GRAMMAR_CHARS = 128_000
# Each repetition costs at least 8 grammar characters (`(char )?`), so no larger count can fit.
MAX_SCHEMA_COUNT = MAX_GRAMMAR_CHARS // 8
# Levels of JSON nesting inside the schema (a property of an object is two levels down); rule
# names grow with the path, so deep nesting also makes long names.
MAX_SCHEMA_DEPTH = 32
# Converter steps: one per visited subschema, k(k+1)/2 for an object with k optional properties,
# and one per earlier rule whose name clashes. ~3 µs each: the conversion stays under ~0.1 s.
MAX_CONVERTER_STEPS = 25_000
# Accepted grammars only, bounded in characters (a few kB each for real schemas).
GRAMMAR_CACHE_CHARS = 4_000_000

_COUNT_KEYWORDS = ("minLength", "maxLength", "minItems", "maxItems")
# Keywords whose value maps names to subschemas: their keys are names, not keywords.
_NAME_MAPS = frozenset({"properties", "$defs", "definitions", "patternProperties"})
# `{m}`, `{m,}`, `{m,n}` as the converter reads them (it int()s each side of the comma).
_QUANTIFIER = re.compile(r"\{([^{}]*)\}")

_cache: LRUCache[str, str] = LRUCache(maxsize=GRAMMAR_CACHE_CHARS, getsizeof=len)
_cache_lock = threading.Lock()  # conversions run in worker threads; cachetools is not locked


class _TooComplex(Exception):
    pass


def schema_key(schema: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(schema, sort_keys=True).encode()).hexdigest()


# Where a schema came from, for error messages: (what to call it, the request `param`).
RESPONSE_FORMAT = ("response_format.json_schema", "response_format")


def _too_complex(detail: str, where: tuple[str, str] = RESPONSE_FORMAT) -> InvalidRequestError:
    return InvalidRequestError(f"{where[0]} is too complex: {detail}", param=where[1])


def _pointer(path: list[str]) -> str:
    """The JSON pointer of a schema node, shortened for the error message."""
    pointer = "/" + "/".join(path)
    return pointer if len(pointer) <= 80 else pointer[:77] + "..."


def _pattern_counts(pattern: str) -> list[int]:
    """Every number in a `{...}` quantifier (conservatively: also ones the converter would
    read as literal text). Raises ValueError on a quantifier the converter could not read."""
    counts = []
    for match in _QUANTIFIER.finditer(pattern):
        for side in match.group(1).split(","):
            side = side.strip()
            if side:
                counts.append(int(side))
    return counts


def check_schema_bounds(schema: Any, where: tuple[str, str] = RESPONSE_FORMAT) -> None:
    """Before any conversion: remote `$ref`s (llama-cpp-python's converter would fetch them with
    requests.get: SSRF from a request body), nesting, and every count the converter expands."""
    stack: list[tuple[Any, list[str], bool]] = [(schema, [], False)]
    while stack:
        node, path, is_name_map = stack.pop()
        if len(path) > MAX_SCHEMA_DEPTH:
            raise _too_complex(
                f"it nests deeper than {MAX_SCHEMA_DEPTH} levels (at {_pointer(path)}).", where
            )
        if isinstance(node, list):
            stack.extend((v, [*path, str(i)], False) for i, v in enumerate(node))
            continue
        if not isinstance(node, dict):
            continue
        _check_ref(node.get("$ref"), where)  # the converter resolves `$ref` in every object
        if not is_name_map:
            _check_counts(node, path, where)
        for key, value in node.items():
            stack.append((value, [*path, str(key)], not is_name_map and key in _NAME_MAPS))


def _check_ref(ref: Any, where: tuple[str, str]) -> None:
    if ref is not None and not (isinstance(ref, str) and ref.startswith("#")):
        raise InvalidRequestError(
            f"{where[0]} may only use local `$ref`s (`#/...`).", param=where[1]
        )


def _check_counts(node: dict[str, Any], path: list[str], where: tuple[str, str]) -> None:
    counts: list[tuple[str, Any]] = [(f"`{k}`", node[k]) for k in _COUNT_KEYWORDS if k in node]
    pattern = node.get("pattern")
    if isinstance(pattern, str):
        try:
            counts += [("a `{m,n}` in `pattern`", n) for n in _pattern_counts(pattern)]
        except ValueError:
            raise InvalidRequestError(
                f"{where[0]} has an unreadable quantifier in the pattern at {_pointer(path)}.",
                param=where[1],
            ) from None
    for label, value in counts:
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise InvalidRequestError(
                f"{where[0]}: {label} at {_pointer(path)} must be a non-negative integer.",
                param=where[1],
            )
        if value > MAX_SCHEMA_COUNT:
            raise _too_complex(
                f"{label} at {_pointer(path)} is {value}; at most {MAX_SCHEMA_COUNT} is "
                "supported (each repetition becomes grammar rules).",
                where,
            )


class _BoundedConverter(SchemaConverter):  # type: ignore[misc]
    """llama-cpp-python's converter on a budget. Hooks its two recursion points: `visit` (every
    subschema, before the converter builds anything for it) and `_add_rule` (every rule kept)."""

    def __init__(self) -> None:
        super().__init__(prop_order={}, allow_fetch=False, dotall=False, raw_pattern=False)  # type: ignore[no-untyped-call]
        self._chars = 0
        self._steps = 0
        self._clashes: dict[str, int] = {}

    def _step(self, n: int) -> None:
        self._steps += n
        if self._steps > MAX_CONVERTER_STEPS:
            raise _TooComplex("it has too many subschemas, references or optional properties")

    def _reserve(self, chars: int) -> None:
        if self._chars + chars > MAX_GRAMMAR_CHARS:
            raise _TooComplex(
                f"its grammar would exceed {MAX_GRAMMAR_CHARS} characters; lower its length "
                "and item bounds"
            )

    def visit(self, schema: Any, name: str) -> str:
        self._step(1)
        if isinstance(schema, dict):
            # The repetition this node expands, charged before the converter builds it. A
            # repeated item is a rule name no longer than this node's name plus a suffix.
            item = len(name) + 32
            if schema.get("type") == "string":
                self._reserve(8 * max(_int(schema.get("minLength")), _int(schema.get("maxLength"))))
            self._reserve(item * max(_int(schema.get("minItems")), _int(schema.get("maxItems"))))
            pattern = schema.get("pattern")
            if isinstance(pattern, str):
                self._reserve(item * sum(_pattern_counts(pattern)))
            properties = schema.get("properties")
            if isinstance(properties, dict):
                # Each optional property starts a chain through the ones after it: k(k+1)/2.
                required = schema.get("required")
                names = (
                    {r for r in required if isinstance(r, str)}
                    if isinstance(required, list)
                    else set()
                )
                optional = sum(1 for p in properties if p not in names) + 1  # +1: additional
                self._step(optional * (optional + 1) // 2)
        return str(super().visit(schema, name))  # type: ignore[no-untyped-call]

    def _add_rule(self, name: str, rule: str) -> str:
        base = INVALID_RULE_CHARS_RE.sub("-", name)
        if self._rules.get(base, rule) != rule:
            # Another rule has this name: the converter probes name0, name1, ... for a free one.
            self._step(self._clashes.get(base, 0))
        before = len(self._rules)
        key = str(super()._add_rule(name, rule))  # type: ignore[no-untyped-call]
        if len(self._rules) > before:  # a new rule (an identical one is kept once)
            self._clashes[base] = self._clashes.get(base, 0) + 1
            self._chars += len(key) + len(rule) + 5  # "name ::= rule\n"
            self._reserve(0)
        return key


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _convert(schema_json: str) -> str:
    converter = _BoundedConverter()
    schema = converter.resolve_refs(json.loads(schema_json), "stdin")
    converter.visit(schema, "")
    return str(converter.format_grammar())  # type: ignore[no-untyped-call]


def gbnf_for_schema(schema: dict[str, Any]) -> str:
    """{} means json_object: any JSON object. Raises 400 for schemas we cannot compile."""
    if not schema:
        return JSON_GBNF
    check_schema_bounds(schema)
    key = schema_key(schema)
    with _cache_lock:
        cached = _cache.get(key)
    if cached is not None:
        return cached
    try:
        gbnf = _convert(json.dumps(schema))
    except _TooComplex as exc:
        raise _too_complex(f"{exc}.") from None
    except Exception as exc:  # the converter asserts and raises assorted errors on bad schemas
        raise InvalidRequestError(
            f"response_format.json_schema could not be compiled: {type(exc).__name__}",
            param="response_format",
        ) from None
    with _cache_lock:
        _cache[key] = gbnf
    return gbnf


def gbnf_rules_for_schemas(
    schemas: list[tuple[str, dict[str, Any]]], where: tuple[str, str]
) -> str:
    """Rules for several schemas in one grammar (no `root`): rule `name` matches its schema.
    One converter, on one budget, so rules the schemas share (`string`, `space`, ...) are
    written once; each schema resolves its own local `$ref`s. Raises 400 naming `where`."""
    converter = _BoundedConverter()
    try:
        for i, (name, schema) in enumerate(schemas):
            check_schema_bounds(schema, where)
            resolved = converter.resolve_refs(json.loads(json.dumps(schema)), f"schema{i}")
            converter.visit(resolved, name)
        return str(converter.format_grammar())  # type: ignore[no-untyped-call]
    except _TooComplex as exc:
        raise _too_complex(f"{exc}.", where) from None
    except InvalidRequestError:
        raise
    except Exception as exc:  # the converter asserts and raises assorted errors on bad schemas
        raise InvalidRequestError(
            f"{where[0]} could not be compiled: {type(exc).__name__}", param=where[1]
        ) from None


def build_grammar(gbnf: str) -> LlamaGrammar:
    try:
        return LlamaGrammar.from_string(gbnf, verbose=False)
    except ValueError:
        raise InvalidRequestError(
            "response_format.json_schema produced an invalid grammar.", param="response_format"
        ) from None
