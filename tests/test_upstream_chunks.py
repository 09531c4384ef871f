"""The upstream reader's two splitters and two decoders agree.

A read's complete lines are split into `data:` payloads by a byte-level fast path when they use
the canonical framing (`data: <json>\\n\\n` per event), or line by line otherwise; both must
find the same payloads, and the fast path must refuse every other framing.

`openai_upstream` reads a proxied stream's chunks through typed msgspec views (the fast path) and
falls back to orjson dicts walked field by field when a read does not fit them. These tests feed
both the same payloads: where the typed view accepts a read, it must find exactly what the dict
walk finds; where the read is odd or hostile, the typed view must refuse it, so that the dict walk
(whose end-to-end behaviour tests/test_upstream.py checks) decides.
"""

from __future__ import annotations

import orjson
import pytest

from llm_api.services.llm.backends.openai_upstream import (
    _decode,
    _decode_array,
    _decode_typed,
    _fold_dicts,
    _fold_typed,
    _split_canonical,
    _split_lines,
    _Totals,
)
from llm_api.services.llm.backends.upstream_wire import Rich
from llm_api.services.llm.types import Frame


def _chat(content: object = None, finish: object = None, **extra: object) -> bytes:
    delta = {} if content is None else {"content": content}
    choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
    return orjson.dumps(
        {
            "id": "chatcmpl-1",
            "object": "chat.completion.chunk",
            "created": 1,
            "model": "m",
            "system_fingerprint": None,
            "choices": [choice],
            **extra,
        }
    )


def _via_dicts(payloads: list[bytes]) -> tuple[list[str], _Totals, str | None]:
    texts: list[str] = []
    totals = _Totals()
    error, _ = _fold_dicts(_decode(payloads), texts, totals)
    return texts, totals, error


def _frames(texts: list[str], rich: Rich | None) -> list[Frame]:
    """What the reader makes of a read: Rich's frames, or the text as one."""
    if rich is not None:
        return rich.close()
    return [Frame(text="".join(texts), tokens=len(texts))] if texts else []


FITTING = {
    "tokens": [_chat(""), _chat("Hel"), _chat("lo"), _chat(None, "stop")],
    "role chunk first": [
        orjson.dumps({"choices": [{"delta": {"role": "assistant", "content": None}}]}),
        _chat("a"),
    ],
    "unicode and escapes": [_chat('é\n"ü" 🙂'), _chat("\\u0000")],
    "legacy completions": [
        orjson.dumps({"object": "text_completion", "choices": [{"text": "x", "index": 0}]}),
        orjson.dumps({"choices": [{"text": "", "finish_reason": "length"}]}),
    ],
    "usage chunk": [
        _chat("a", "length"),
        orjson.dumps({"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 3}}),
    ],
    "usage null on every chunk (vLLM continuous usage off)": [
        _chat("a", usage=None),
        _chat(None, "stop", usage=None),
    ],
    "several choices": [
        orjson.dumps({"choices": [{"delta": {"content": "a"}}, {"delta": {"content": "b"}}]})
    ],
    "nulls where servers send them in text chunks": [
        orjson.dumps(
            {
                "choices": [
                    {
                        "delta": {
                            "role": "assistant",
                            "content": "a",
                            "refusal": None,
                            "tool_calls": None,
                            "reasoning_content": None,
                        },
                        "logprobs": None,
                    }
                ]
            }
        )
    ],
    "usage details": [
        orjson.dumps(
            {
                "choices": [],
                "usage": {
                    "prompt_tokens": 3,
                    "completion_tokens": 1,
                    "total_tokens": 4,
                    "prompt_tokens_details": {"cached_tokens": 2},
                    "completion_tokens_details": None,
                },
            }
        )
    ],
    "no choices key, null choices, null delta": [
        orjson.dumps({"id": "x"}),
        orjson.dumps({"choices": None}),
        orjson.dumps({"choices": [{"delta": None, "text": "t"}]}),
    ],
    "whitespace around a payload": [b"  " + _chat("a") + b"\r"],
    "nothing": [],
}


@pytest.mark.parametrize("payloads", FITTING.values(), ids=FITTING.keys())
def test_the_typed_view_finds_what_the_dict_walk_finds(payloads: list[bytes]) -> None:
    typed = _decode_typed(payloads)
    assert typed is not None, "this read should take the fast path"
    texts: list[str] = []
    totals = _Totals()
    _fold_typed(typed, texts, totals)
    assert (texts, totals, None) == _via_dicts(payloads)
    # Nothing but text in what the typed view accepts: the dict walk makes the same one frame.
    dict_texts: list[str] = []
    _, dict_rich = _fold_dicts(_decode(payloads), dict_texts, _Totals())
    assert _frames(texts, None) == _frames(dict_texts, dict_rich)


REFUSED = {
    # Reported by the dict walk as errors: the typed view must not swallow them.
    "error object": [_chat("a"), orjson.dumps({"error": {"message": "overloaded"}})],
    "error null": [orjson.dumps({"error": None})],
    "error string": [orjson.dumps({"error": "boom", "choices": []})],
    "not an object": [_chat("a"), b"5"],
    "an array": [b"[1, 2]"],
    "two values in one payload": [b'{"choices": []}, {"choices": []}'],
    "array breakout": [b"1], [2"],
    "not JSON": [b"{not json"],
    # Skipped by the dict walk field by field; the typed view refuses the read instead.
    "choices not a list": [orjson.dumps({"choices": 3})],
    "choice not an object": [orjson.dumps({"choices": [7, None]})],
    "delta a string": [orjson.dumps({"choices": [{"delta": "x", "text": 5}]})],
    "content not a string": [orjson.dumps({"choices": [{"delta": {"content": ["a"]}}]})],
    "finish reason not a string": [orjson.dumps({"choices": [{"finish_reason": 1}]})],
    "count a bool": [orjson.dumps({"usage": {"prompt_tokens": True}})],
    "count negative": [orjson.dumps({"usage": {"completion_tokens": -1}})],
    "count a float": [orjson.dumps({"usage": {"completion_tokens": 2.0}})],
    "count a string": [orjson.dumps({"usage": {"prompt_tokens": "many"}})],
    # More than text: relayed by the dict walk (upstream_wire.Rich), which only it does.
    "tool calls, logprobs, reasoning": [
        orjson.dumps(
            {
                "choices": [
                    {
                        "delta": {"tool_calls": [{"index": 0, "function": {"name": "f"}}]},
                        "logprobs": {"content": [{"token": "a", "logprob": -0.1}]},
                        "finish_reason": "tool_calls",
                    }
                ],
                "prompt_logprobs": None,
            }
        ),
        orjson.dumps(
            {
                "choices": [
                    {
                        "delta": {
                            "content": "x",
                            "reasoning_content": "r",
                            "reasoning": None,
                            "refusal": None,
                            "tool_calls": [
                                {"index": 1, "id": "c", "function": {"arguments": "{}"}}
                            ],
                        },
                        "logprobs": {
                            "content": [
                                {
                                    "token": "x",
                                    "logprob": -1,
                                    "bytes": [120],
                                    "top_logprobs": [{"token": "y", "logprob": -2.5}],
                                }
                            ]
                        },
                    }
                ],
                "usage": {
                    "prompt_tokens": 3,
                    "prompt_tokens_details": {"cached_tokens": 2},
                    "completion_tokens_details": None,
                },
            }
        ),
    ],
    "a delta field we do not read": [orjson.dumps({"choices": [{"delta": {"audio": {}}}]})],
    "a refusal": [orjson.dumps({"choices": [{"delta": {"refusal": "no"}}]})],
    "a usage field we do not read": [orjson.dumps({"usage": {"cost": 1}})],
    "legacy completions logprobs": [
        orjson.dumps({"choices": [{"text": "a", "logprobs": {"tokens": ["a"]}}]})
    ],
    "a tool call without an index": [
        orjson.dumps({"choices": [{"delta": {"tool_calls": [{"id": "c"}]}}]})
    ],
}


@pytest.mark.parametrize("payloads", REFUSED.values(), ids=REFUSED.keys())
def test_odd_reads_are_left_to_the_dict_walk(payloads: list[bytes]) -> None:
    assert _decode_typed(payloads) is None


def test_what_the_dict_walk_makes_of_refused_reads() -> None:
    """The fallback's established behaviour, which the typed path must not change."""
    texts, totals, error = _via_dicts(REFUSED["error object"])
    assert texts == ["a"] and error == "overloaded"
    assert _via_dicts(REFUSED["not an object"])[2] == "The upstream sent a malformed chunk."
    assert _via_dicts(REFUSED["error null"])[2] == "Upstream error."
    texts, totals, error = _via_dicts(
        REFUSED["count negative"] + [orjson.dumps({"usage": {"prompt_tokens": 4}})]
    )
    assert error is None and (totals.prompt_tokens, totals.completion_tokens) == (4, None)
    assert _via_dicts(REFUSED["finish reason not a string"])[1].finish == "1"


def _sse(*payloads: bytes) -> bytes:
    return b"".join(b"data: " + p + b"\n\n" for p in payloads)


def _fast(block: bytes) -> tuple[list[object], int, bool] | None:
    """What the reader takes from the fast path for a block, or None when it steps aside (the
    framing is not canonical, or the array does not decode into typed chunks)."""
    split = _split_canonical(block)
    if split is None:
        return None
    array, count, done = split
    typed = _decode_array(array, count)
    return None if typed is None else (list(typed), count, done)


CANONICAL = {
    "tokens": _sse(*FITTING["tokens"]),
    "one event": _sse(_chat("a")),
    "ended by [DONE]": _sse(_chat("a"), _chat(None, "stop"), b"[DONE]"),
    "only [DONE]": _sse(b"[DONE]"),
    "nothing": b"",
    "extra spaces and a CR inside the value": _sse(b"  " + _chat("a") + b" \r"),
    "text that looks like framing": _sse(_chat("\n\ndata: [DONE]\n\n")),
}


@pytest.mark.parametrize("block", CANONICAL.values(), ids=CANONICAL.keys())
def test_the_fast_path_finds_what_the_line_split_finds(block: bytes) -> None:
    fast = _fast(block)
    assert fast is not None, "this block should take the fast path"
    typed, count, done = fast
    payloads, done_by_lines = _split_lines(block)
    assert (count, done) == (len(payloads), done_by_lines)
    assert typed == _decode_typed(payloads)


OTHER = {
    "CRLF line ends": b"data: {}\r\n\r\n",
    "a comment first": b": keep-alive\n\n" + _sse(b"{}"),
    "an event line": b"event: message\ndata: {}\n\n",
    "an id line": _sse(b"{}") + b"id: 7\n\n",
    "data: without its space": b"data:{}\n\n",
    "one event over two data lines": b"data: {\ndata: }\n\n",
    "events not separated by a blank line": b"data: {}\ndata: {}\n\n",
    "a last line without its newline (EOF)": b"data: {}",
    "a trailing blank line too many": _sse(b"{}") + b"\n",
    "events after [DONE]": _sse(_chat("a"), b"[DONE]", _chat("b")),
    "[DONE] inside a line": _sse(b"x data: [DONE]"),
    "[DONE] with two spaces": _sse(_chat("a")) + b"data:  [DONE]\n\n",
    "an empty payload": _sse(b""),
    "an error object": _sse(_chat("a"), orjson.dumps({"error": {"message": "x"}})),
    "two values in one payload": _sse(b'{"choices": []}, {"choices": []}'),
}


@pytest.mark.parametrize("block", OTHER.values(), ids=OTHER.keys())
def test_other_blocks_are_left_to_the_line_split(block: bytes) -> None:
    assert _fast(block) is None
