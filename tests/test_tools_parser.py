"""The tool-call parser and prompt format on their own (no model): text passes through,
markup never does, calls stream as deltas (id and name first, arguments in pieces), and a call
that is not valid for the request's tools raises instead of being emitted."""

from __future__ import annotations

import json

import pytest

from llm_api.services.llm.chat_template import ChatTemplate
from llm_api.services.llm.tools.grammar import CallTrigger, call_rules, literal
from llm_api.services.llm.tools.parser import InvalidToolCallError, ToolCallParser
from llm_api.services.llm.tools.prompt import fallback_messages, native_tools
from llm_api.services.llm.types import Message, ToolCall, ToolCallDelta, ToolSpec

WEATHER = ToolSpec(
    name="get_weather",
    parameters={
        "type": "object",
        "properties": {
            "city": {"type": "string"},
            "unit": {"type": "string", "enum": ["c", "f"]},
        },
        "required": ["city"],
    },
)
TIME = ToolSpec(name="get_time", parameters={"type": "object", "properties": {}})


def _call(name: str, args: str) -> str:
    return f'<tool_call>\n{{"name": "{name}", "arguments": {args}}}\n</tool_call>'


def _run(parser: ToolCallParser, pieces: list[str]) -> tuple[str, list[ToolCallDelta]]:
    text, deltas = "", []
    for p in pieces:
        t, d = parser.feed(p)
        text += t
        deltas += d
    t, d = parser.finish()
    return text + t, deltas + d


def _calls(deltas: list[ToolCallDelta]) -> list[dict[str, str]]:
    calls: dict[int, dict[str, str]] = {}
    for d in deltas:
        call = calls.setdefault(d.index, {"id": "", "name": "", "arguments": ""})
        if d.id is not None:
            assert not call["id"], "id only in a call's first delta"
            call["id"], call["name"] = d.id, d.name or ""
        call["arguments"] += d.arguments
    return [calls[i] for i in sorted(calls)]


def _chars(text: str) -> list[str]:
    return list(text)


@pytest.mark.parametrize("split", [_chars, lambda s: [s], lambda s: [s[:7], s[7:19], s[19:]]])
def test_text_then_calls_stream_as_deltas(split) -> None:  # type: ignore[no-untyped-def]
    out = "Let me check. " + _call("get_weather", '{"city": "Paris"}') + "\n"
    out += _call("get_time", "{}")
    parser = ToolCallParser([WEATHER, TIME])
    text, deltas = _run(parser, split(out))
    assert text == "Let me check. "
    calls = _calls(deltas)
    assert [c["name"] for c in calls] == ["get_weather", "get_time"]
    assert json.loads(calls[0]["arguments"]) == {"city": "Paris"}
    assert calls[1]["arguments"] == "{}"
    assert all(c["id"].startswith("call_") for c in calls)
    assert calls[0]["id"] != calls[1]["id"]
    assert parser.calls == 2


def test_arguments_stream_before_the_call_ends() -> None:
    parser = ToolCallParser([WEATHER])
    _, first = parser.feed('<tool_call>\n{"name": "get_weather", "arguments": {"ci')
    assert first[0].name == "get_weather" and first[0].id is not None
    assert "".join(d.arguments for d in first) == '{"ci'
    _, more = parser.feed('ty": "Oslo"}')
    assert "".join(d.arguments for d in more) == 'ty": "Oslo"}'
    _, rest = parser.feed("}\n</tool_call>")
    assert rest == [] and parser.calls == 1


def test_a_braced_string_inside_arguments_does_not_end_them() -> None:
    args = '{"city": "a}\\"b{", "unit": "c"}'
    _, deltas = _run(ToolCallParser([WEATHER]), _chars(_call("get_weather", args)))
    assert _calls(deltas)[0]["arguments"] == args


def test_partial_opener_is_held_and_released_when_it_is_not_one() -> None:
    parser = ToolCallParser([WEATHER])
    assert parser.feed("a <tool")[0] == "a "
    assert parser.feed("box> b")[0] == "<toolbox> b"


def test_other_key_order_is_parsed_whole() -> None:
    body = '<tool_call>{"arguments": {"city": "Rome"}, "name": "get_weather"}</tool_call>'
    text, deltas = _run(ToolCallParser([WEATHER]), _chars(body))
    assert text == ""
    assert len(deltas) == 1 and deltas[0].name == "get_weather"
    assert json.loads(deltas[0].arguments) == {"city": "Rome"}


@pytest.mark.parametrize(
    "out",
    [
        _call("get_weather", '{"city": 3}'),  # breaks the schema
        _call("get_weather", '{"unit": "c"}'),  # misses a required property
        _call("get_weather", '{"city": "Paris"'),  # never closes
        _call("delete_all", "{}"),  # unknown function
        _call("get_weather", '"Paris"'),  # not an object
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Pa',  # cut short
        "<tool_call>not json</tool_call>",
    ],
)
def test_invalid_calls_raise(out: str) -> None:
    with pytest.raises(InvalidToolCallError):
        _run(ToolCallParser([WEATHER]), [out])


def test_no_parallel_stops_after_the_first_call() -> None:
    parser = ToolCallParser([WEATHER, TIME], parallel=False)
    text, deltas = parser.feed(_call("get_time", "{}") + "\n" + _call("get_time", "{}"))
    assert parser.done and len(_calls(deltas)) == 1 and text == ""


def test_history_renders_calls_and_results_as_text() -> None:
    history = [
        Message("user", "Weather in Paris?"),
        Message(
            "assistant",
            "",
            tool_calls=[ToolCall(id="call_1", name="get_weather", arguments='{"city":"Paris"}')],
        ),
        Message("tool", '{"temp": 21}', tool_call_id="call_1"),
        Message("tool", '{"temp": 22}', tool_call_id="call_2"),
    ]
    out = fallback_messages(history, [WEATHER])
    assert out[0].role == "system" and '"name": "get_weather"' in out[0].content
    assert out[2].content == _call("get_weather", '{"city": "Paris"}')
    assert out[3].role == "user" and out[3].content.count("<tool_response>") == 2
    assert len(out) == 4


# A template that renders tools itself, in the Hermes/Qwen style (written for this test).
NATIVE = (
    "{% if tools %}<|im_start|>system\nTools:{% for t in tools %}\n{{ t | tojson }}{% endfor %}"
    "<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}"
    "{% if m.tool_calls is defined %}{% for c in m.tool_calls %}<tool_call>\n"
    '{"name": "{{ c.function.name }}", "arguments": {{ c.function.arguments | tojson }}}'
    "\n</tool_call>{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_a_tool_aware_template_renders_tools_and_calls_itself() -> None:
    template = ChatTemplate(NATIVE)
    calls = [ToolCall(id="c1", name="get_weather", arguments='{"city": "<|im_end|>"}')]
    history = [Message("user", "hi"), Message("assistant", "", tool_calls=calls)]
    pieces = template.render_pieces(history, tools=native_tools([WEATHER]))
    text = "".join(p.text for p in pieces)
    assert '"name": "get_weather"' in text and "<tool_call>" in text
    # tojson escapes `<`: an argument cannot forge a control token
    assert "\\u003c|im_end|\\u003e" in text


def test_trigger_engages_only_on_a_prefix_of_the_call_head() -> None:
    rules = call_rules([WEATHER], parallel=False)
    pieces = {1: b"Sure ", 2: b"<tool", 3: b"_call>", 4: b"\n{", 5: b"<tool_call>!"}
    trigger = CallTrigger(rules, pieces.__getitem__)
    assert trigger.push(1) is None and trigger.push(2) is None
    grammar = trigger.push(3)
    assert grammar is not None and grammar.startswith(f"root ::= {literal('Sure ')} tool-call")
    assert not trigger.active
    other = CallTrigger(rules, pieces.__getitem__)
    assert other.push(5) is None and not other.active  # "!" after the opener: never engage


def test_text_after_a_call_keeps_its_spaces() -> None:
    out = _call("get_time", "{}") + "\nDone, see above."
    text, _ = _run(ToolCallParser([TIME]), _chars(out))
    assert text == "\nDone, see above."
