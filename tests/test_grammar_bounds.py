"""Schema grammars are bounded before they are built (issue 22, item 1): every count a JSON schema
can expand is checked first, the conversion runs on a budget, and only accepted grammars are
cached, in a cache bounded in characters. The last test measures a real server's memory."""

from __future__ import annotations

import itertools
import json
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from llama_cpp.llama_grammar import json_schema_to_gbnf

from llm_api.core.exceptions import InvalidRequestError
from llm_api.services.llm import grammar
from tests.conftest import MODEL, LiveServer, start_live_server


def _nested(levels: int) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "string"}
    for _ in range(levels):
        schema = {"type": "object", "properties": {"x" * 200: schema}, "required": ["x" * 200]}
    return schema


def _all_of_chain(levels: int, width: int) -> dict[str, Any]:
    """Each level's `allOf` inlines the next definition's properties (no memo): width**levels."""
    defs: dict[str, Any] = {}
    for d in range(levels):
        inner = {"allOf": [{"$ref": f"#/$defs/d{d + 1}"}]} if d < levels - 1 else {"type": "string"}
        names = [f"p{j}" for j in range(width)]
        defs[f"d{d}"] = {
            "type": "object",
            "properties": dict.fromkeys(names, inner),
            "required": names,
        }
    return {"$defs": defs, "allOf": [{"$ref": "#/$defs/d0"}]}


def _clashing_names(n: int) -> dict[str, Any]:
    """Property names that all become the same rule name (`a-b`: a run of characters a rule
    name cannot hold is one `-`), each with a different rule."""
    marks = "!#$%&'()*+,./:;<=>?@[]^_`{|}~"
    names = [
        "a" + "".join(m) + "b" for m in itertools.islice(itertools.product(marks, repeat=3), n)
    ]
    return {"type": "object", "properties": dict.fromkeys(names, {}), "required": names}


# Each of these expands (as llama-cpp-python converts it) to megabytes or gigabytes of grammar,
# or to seconds of CPU; each is at most a few kB of JSON.
BOMBS: dict[str, dict[str, Any]] = {
    "maxLength": {"type": "string", "maxLength": 25_000_000},
    "minLength": {"type": "string", "minLength": 25_000_000},
    "maxLength within the count bound": {"type": "string", "maxLength": 16_000},
    "minItems": {"type": "array", "items": {"type": "integer"}, "minItems": 25_000_000},
    "maxItems": {"type": "array", "items": {"type": "integer"}, "maxItems": 25_000_000},
    "maxItems of a long-named item": {
        "type": "object",
        "properties": {"a" * 3000: {"type": "array", "items": {}, "maxItems": 1000}},
    },
    "pattern {m}": {"type": "string", "pattern": "^a{25000000}$"},
    "pattern {m,n}": {"type": "string", "pattern": "^[a-z]{0,25000000}$"},
    "pattern {m,}": {"type": "string", "pattern": "^(ab){25000000,}$"},
    "nesting": _nested(32),  # 64 levels of JSON, names up to 6 kB
    "allOf expansion": _all_of_chain(12, 4),
    "optional properties": {
        "type": "object",
        "properties": {f"p{i}": {"type": "string"} for i in range(900)},
    },
    "clashing rule names": _clashing_names(2000),
}


@pytest.mark.parametrize("name", list(BOMBS))
def test_expanding_schemas_are_refused_before_they_are_built(name: str) -> None:
    schema = BOMBS[name]
    assert len(json.dumps(schema)) < 64_000  # what the request model lets through
    tracemalloc.start()
    try:
        with pytest.raises(InvalidRequestError) as info:
            grammar.gbnf_for_schema(schema)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert info.value.param == "response_format"
    assert "too complex" in info.value.message
    assert peak < 4_000_000, f"{name}: {peak / 1e6:.1f} MB allocated while refusing it"


@pytest.mark.parametrize(
    ("schema", "word"),
    [
        ({"type": "string", "maxLength": -1}, "non-negative integer"),
        ({"type": "string", "maxLength": 2.5}, "non-negative integer"),
        ({"type": "array", "maxItems": True}, "non-negative integer"),
        ({"type": "string", "pattern": "^a{1,x}$"}, "quantifier"),
    ],
)
def test_malformed_counts_are_400(schema: dict[str, Any], word: str) -> None:
    with pytest.raises(InvalidRequestError) as info:
        grammar.gbnf_for_schema(schema)
    assert word in info.value.message


ACCEPTED: list[dict[str, Any]] = [
    {"type": "string", "maxLength": 15_000},
    {"type": "array", "items": {"type": "string", "maxLength": 40}, "minItems": 1, "maxItems": 50},
    {"type": "string", "pattern": "^[A-Z]{2}-\\d{4}(x|y){0,3}$"},
    {
        "type": "object",
        "properties": {
            "name": {"type": "string", "minLength": 1, "maxLength": 100},
            "tags": {"type": "array", "items": {"$ref": "#/$defs/tag"}, "maxItems": 10},
            "extra": {"anyOf": [{"type": "integer"}, {"type": "null"}]},
        },
        "required": ["name"],
        "$defs": {"tag": {"type": "string", "enum": ["a", "b"]}},
    },
    _nested(15),
    {"type": "object", "properties": {f"p{i}": {"type": "string"} for i in range(150)}},
]


@pytest.mark.parametrize("schema", ACCEPTED, ids=lambda s: json.dumps(s)[:40])
def test_accepted_schemas_compile_as_llama_cpp_python_does(schema: dict[str, Any]) -> None:
    """The budget changes nothing for a schema within it: the grammar is the converter's own."""
    started = time.process_time()
    gbnf = grammar.gbnf_for_schema(schema)
    assert time.process_time() - started < 1.0
    assert gbnf == json_schema_to_gbnf(json.dumps(schema))
    assert len(gbnf) <= grammar.MAX_GRAMMAR_CHARS


def test_only_accepted_grammars_are_cached_and_the_cache_is_bounded() -> None:
    with grammar._cache_lock:
        grammar._cache.clear()
    for name, schema in BOMBS.items():
        with pytest.raises(InvalidRequestError):
            grammar.gbnf_for_schema(schema)
        assert grammar.schema_key(schema) not in grammar._cache, name
    accepted = {"type": "string", "maxLength": 10}
    assert grammar.gbnf_for_schema(accepted) is grammar.gbnf_for_schema(accepted)  # cached
    # Distinct near-limit grammars (~120 kB each) never make the cache exceed its bound.
    for length in range(14_000, 14_000 + 2 * grammar.GRAMMAR_CACHE_CHARS // 100_000):
        grammar.gbnf_for_schema({"type": "string", "maxLength": length})
        assert grammar._cache.currsize <= grammar.GRAMMAR_CACHE_CHARS
    assert grammar._cache.currsize > grammar.GRAMMAR_CACHE_CHARS // 2


# --- a real server -------------------------------------------------------------------------------


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    live = start_live_server(tmp_path_factory.mktemp("grammar-server"))
    yield live
    live.stop()


def _schema_request(server: LiveServer, schema: dict[str, Any]) -> httpx.Response:
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Answer."}],
        "max_tokens": 4,
        "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}},
    }
    return httpx.post(
        f"{server.base_url}/v1/chat/completions", json=body, headers=server.headers, timeout=120
    )


@pytest.mark.model
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads RSS from /proc")
def test_twenty_expanding_schemas_leave_a_servers_memory_flat(server: LiveServer) -> None:
    """The review's attack on a live server: each request a new count, so no cache can help.
    Before, each built a ~200 MB grammar and the cache kept it (1.0 → 2.9 GiB in five)."""
    assert _schema_request(server, {"type": "string", "maxLength": 20}).status_code == 200
    assert _schema_request(server, BOMBS["maxLength"]).status_code == 400  # warm the path
    before = _rss_mb(server.proc.pid)
    kinds = ["maxLength", "minItems", "pattern {m,n}", "maxItems"]
    for i in range(20):
        schema = json.loads(
            json.dumps(BOMBS[kinds[i % 4]]).replace("25000000", str(25_000_000 + i))
        )
        resp = _schema_request(server, schema)
        assert resp.status_code == 400, resp.text
        error = resp.json()["error"]
        assert error["param"] == "response_format" and "too complex" in error["message"]
        grown = _rss_mb(server.proc.pid) - before
        assert grown < 50, f"RSS grew {grown:.0f} MB after {i + 1} requests"
    # ...and it still serves constrained output.
    ok = _schema_request(server, {"type": "string", "maxLength": 20})
    assert ok.status_code == 200, ok.text
