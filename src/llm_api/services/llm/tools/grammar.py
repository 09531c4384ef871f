"""Grammars for tool calls, and the trigger that engages one mid-generation (`auto`).

Every call is written as CALL_HEAD + `"<name>", "arguments": <object>}` + "\\n</tool_call>", the
arguments through grammar.py's schema converter (with its bounds), so a constrained call's
arguments are valid JSON for that tool's schema by construction. After the last call the
grammar accepts only end-of-generation: `required` and named calls stop after their call(s).

`auto` lets the model write text or call: the grammar engages once the output contains the call
opener (what llama.cpp's lazy grammars do). llama.cpp's own lazy sampler is not used: when the
token that completes its trigger carries more text than the grammar accepts, llama.cpp throws
a C++ exception from inside the sampler, which through ctypes aborts the process. Instead the
engine asks `CallTrigger` after each token; it engages only when the text after the opener is
a prefix of what the grammar accepts, with a grammar that first matches the text already
generated, so the sampler chain can be rebuilt and fed every earlier token safely. When the
text after the opener is anything else, the call stays unconstrained and the parser rejects it
unless it is valid (an error frame, never an invalid call).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence

from llm_api.services.llm.grammar import gbnf_rules_for_schemas
from llm_api.services.llm.tools.prompt import CALL_CLOSE, CALL_HEAD, CALL_OPEN
from llm_api.services.llm.types import ToolSpec

TOOLS_PARAM = ("tools[].function.parameters", "tools")
# Calls in one answer with parallel_tool_calls. Small models, once calling, tend to repeat the
# call until max_tokens; the grammar ends the answer after this many.
MAX_PARALLEL_CALLS = 4
# Opener text kept while waiting for the trigger is bounded: past this much output without a
# call, the trigger still searches only the recent text (the opener is 11 characters).
_SCAN_WINDOW = 64


def literal(text: str) -> str:
    """A GBNF string literal matching `text` exactly."""
    out = ['"']
    for ch in text:
        code = ord(ch)
        if ch in '"\\':
            out.append("\\" + ch)
        elif 0x20 <= code < 0x7F:
            out.append(ch)
        elif code <= 0xFF:
            out.append(f"\\x{code:02X}")
        elif code <= 0xFFFF:
            out.append(f"\\u{code:04X}")
        else:
            out.append(f"\\U{code:08X}")
    out.append('"')
    return "".join(out)


def arguments_schema(tool: ToolSpec) -> dict:  # type: ignore[type-arg]
    # OpenAI: omitted parameters mean a function that takes no arguments.
    return tool.parameters or {"type": "object", "properties": {}}


def call_rules(tools: Sequence[ToolSpec], *, parallel: bool) -> str:
    """Every rule but `root`: `tool-call` is one call, `tool-calls-more` what may follow."""
    schemas = [(f"tool-{i}-args", arguments_schema(t)) for i, t in enumerate(tools)]
    rules = gbnf_rules_for_schemas(schemas, TOOLS_PARAM)
    choices = " | ".join(
        f'{literal(json.dumps(t.name))} ", \\"arguments\\": " tool-{i}-args'
        for i, t in enumerate(tools)
    )
    return "\n".join(
        [
            rules,
            f"tool-call ::= {literal(CALL_HEAD)} tool-call-body",
            f'tool-call-body ::= ( {choices} ) "}}" {literal(chr(10) + CALL_CLOSE)}',
            # After the first call: more calls (parallel), or nothing.
            f'tool-calls-more ::= ( "\\n" tool-call ){{0,{MAX_PARALLEL_CALLS - 1}}}'
            if parallel
            else 'tool-calls-more ::= ""',
            "",
        ]
    )


def call_grammar(rules: str, *, prefix: str = "") -> str:
    """The whole grammar: `prefix` (text already generated, matched exactly), then the calls."""
    head = f"{literal(prefix)} " if prefix else ""
    return f"root ::= {head}tool-call tool-calls-more\n{rules}"


def continuation_grammar(rules: str, written: str) -> str:
    """The calls' grammar from a point where `written` (a prefix of CALL_HEAD) is already out,
    for a generation restarted there (the one-at-a-time backend)."""
    rest = CALL_HEAD[len(written) :]
    head = f"{literal(rest)} " if rest else ""
    return f"root ::= {head}tool-call-body tool-calls-more\n{rules}"


class CallTrigger:
    """Watches one sequence's output, token by token, for the call opener (auto tool choice).

    `piece(token)` must give the bytes llama.cpp's grammar sees for a token (its
    token-to-piece with special tokens rendered), so that the prefix literal matches exactly.
    `push` returns the grammar to engage now, or None; once `active` is False it never will."""

    def __init__(self, rules: str, piece: Callable[[int], bytes], *, restart: bool = False) -> None:
        """`restart`: the grammar is for a generation restarted after the current token
        (`continuation_grammar`), not for a sampler fed the output so far."""
        self._rules = rules
        self._piece = piece
        self._restart = restart
        self._out = bytearray()
        self.active = True

    def push(self, token: int) -> str | None:
        if not self.active:
            return None
        self._out += self._piece(token)
        start = max(0, len(self._out) - len(self._piece(token)) - _SCAN_WINDOW)
        at = self._out.find(CALL_OPEN.encode(), start)
        if at < 0:
            return None
        self.active = False  # engage now or never
        try:
            text = self._out.decode("utf-8")
        except UnicodeDecodeError:
            return None  # bytes the grammar would decode differently: stay unconstrained
        prefix, tail = text.split(CALL_OPEN, 1)
        written = CALL_OPEN + tail
        if not CALL_HEAD.startswith(written):
            return None
        if self._restart:
            return continuation_grammar(self._rules, written)
        return call_grammar(self._rules, prefix=prefix)
