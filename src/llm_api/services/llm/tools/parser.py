"""Model text → text and tool-call deltas, incrementally, as the pieces arrive.

Text outside `<tool_call>` blocks passes through (a possible start of the opener is held back
until it is decided); the markup itself never does. Inside a block written the way the grammar
writes it (`{"name": "...", "arguments": {...}}`) the call's first delta carries its id and name
as soon as the name is complete, then the arguments stream as they are generated; a JSON
scanner finds where they end. A block in another shape (an unconstrained model's key order) is
held until it closes and then parsed whole.

A call is checked when it ends: arguments that do not parse as a JSON object, an unknown
function, arguments that break the tool's schema, or a block the output leaves unfinished raise
InvalidToolCallError, so the stream ends with an error frame instead of a broken call.
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Callable, Sequence
from typing import Any

import jsonschema

from llm_api.core.exceptions import APIError
from llm_api.services.llm.tools.grammar import arguments_schema
from llm_api.services.llm.tools.prompt import CALL_CLOSE, CALL_OPEN
from llm_api.services.llm.types import ToolCallDelta, ToolSpec

# The grammar's shape, up to the arguments' first character (any whitespace tolerated).
_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"arguments"\s*:\s*(?=\S)')
_TRAILER = re.compile(r"\s*\}\s*" + re.escape(CALL_CLOSE))


class InvalidToolCallError(APIError):
    """The model wrote a tool call that is not valid for the request's tools."""

    status_code = 500
    type = "server_error"
    code = "invalid_tool_call"


def new_call_id() -> str:
    return "call_" + secrets.token_urlsafe(18).replace("-", "x").replace("_", "y")


class _ArgumentsScanner:
    """Where a JSON value that starts with `{` ends (string- and escape-aware)."""

    __slots__ = ("depth", "in_string", "escaped", "started")

    def __init__(self) -> None:
        self.depth = 0
        self.in_string = self.escaped = self.started = False

    def feed(self, text: str) -> int:
        """Characters of `text` that belong to the value; len(text) + 1 means: not ended yet."""
        for i, ch in enumerate(text):
            if self.in_string:
                if self.escaped:
                    self.escaped = False
                elif ch == "\\":
                    self.escaped = True
                elif ch == '"':
                    self.in_string = False
            elif ch == '"':
                self.in_string = True
            elif ch in "{[":
                self.depth += 1
                self.started = True
            elif ch in "}]":
                self.depth -= 1
                if self.depth == 0:
                    return i + 1
        return len(text) + 1


class ToolCallParser:
    def __init__(
        self,
        tools: Sequence[ToolSpec],
        *,
        parallel: bool = True,
        new_id: Callable[[], str] = new_call_id,
    ) -> None:
        self._tools = {t.name: t for t in tools}
        self._parallel = parallel
        self._new_id = new_id
        self._buf = ""  # unparsed output
        self._in_call = False
        self._body = ""  # the open call's text after the opener
        self._name: str | None = None  # set once the head is parsed (streaming mode)
        self._args_at = 0  # where the arguments start in _body
        self._args_sent = 0  # how much of _body has gone out as argument pieces
        self._args_end: int | None = None  # where the arguments end in _body
        self._scanner = _ArgumentsScanner()
        self.calls = 0  # calls completed
        self.started = 0  # calls begun (index of the next one)

    @property
    def done(self) -> bool:
        """No further output can matter: one call made and parallel calls are off."""
        return self.calls > 0 and not self._parallel

    def feed(self, text: str) -> tuple[str, list[ToolCallDelta]]:
        self._buf += text
        out: list[str] = []
        deltas: list[ToolCallDelta] = []
        while self._buf and not self.done:
            if self._in_call:
                if not self._advance_call(deltas):
                    break
                continue
            at = self._buf.find(CALL_OPEN)
            if at < 0:
                keep = _partial_suffix(self._buf, CALL_OPEN)
                if self.started and not self._buf[: len(self._buf) - keep].strip():
                    break  # whitespace after a call: hold it until text follows, if any
                out.append(self._text(self._buf[: len(self._buf) - keep]))
                self._buf = self._buf[len(self._buf) - keep :]
                break
            out.append(self._text(self._buf[:at]))
            self._buf = self._buf[at + len(CALL_OPEN) :]
            self._open_call()
        return "".join(out), deltas

    def finish(self) -> tuple[str, list[ToolCallDelta]]:
        """The output ended: flush held text; an unfinished call is an error unless its text
        is a whole call that only lacks its closing tag."""
        deltas: list[ToolCallDelta] = []
        if self._in_call and not self.done:
            self._body += self._buf
            self._buf = ""
            self._close_call(self._body.rstrip(), deltas, final=True)
        text = "" if self.done else self._buf
        self._buf = ""
        return self._text(text), deltas

    # --- internals ----------------------------------------------------------------------------

    def _text(self, text: str) -> str:
        # Whitespace between and after calls is the format's, not the model's answer.
        return text if self.started == 0 or text.strip() else ""

    def _open_call(self) -> None:
        self._in_call = True
        self._body = ""
        self._name = None
        self._args_end = None
        self._scanner = _ArgumentsScanner()
        self.started += 1

    def _advance_call(self, deltas: list[ToolCallDelta]) -> bool:
        """Consume the buffer into the open call. False: wait for more output."""
        self._body += self._buf
        self._buf = ""
        index = self.started - 1
        if self._name is None:
            head = _HEAD.match(self._body)
            if head is None:
                return self._try_close_whole(deltas)
            name = json.loads(f'"{head.group(1)}"')
            self._check_name(name)
            self._name = name
            self._args_at = self._args_sent = head.end()
            deltas.append(ToolCallDelta(index=index, id=self._new_id(), name=name))
        if self._args_end is None:
            fresh = self._body[self._args_sent :]
            if self._args_sent == self._args_at and fresh.strip() and fresh.lstrip()[0] != "{":
                raise InvalidToolCallError(
                    f"The model called `{self._name}` with arguments that are not a JSON object."
                )
            used = self._scanner.feed(fresh)
            if used <= len(fresh):
                self._args_end = self._args_sent + used
            piece = fresh[: min(used, len(fresh))]
            if piece:
                deltas.append(ToolCallDelta(index=index, arguments=piece))
                self._args_sent += len(piece)
            if self._args_end is None:
                return False
        trailer = self._body[self._args_end :]
        close = _TRAILER.match(trailer)
        if close is None:
            if CALL_CLOSE in trailer or len(trailer) > 64:
                raise InvalidToolCallError(
                    f"The model's call of `{self._name}` does not end where its arguments do."
                )
            return False
        self._validate(self._name, self._body[self._args_at : self._args_end])
        self._end_call(trailer[close.end() :])
        return True

    def _try_close_whole(self, deltas: list[ToolCallDelta]) -> bool:
        """A block not in the grammar's shape: parse it once it closes."""
        at = self._body.find(CALL_CLOSE)
        if at < 0:
            return False
        rest = self._body[at + len(CALL_CLOSE) :]
        self._close_call(self._body[:at], deltas, final=False)
        self._end_call(rest)
        return True

    def _close_call(self, body: str, deltas: list[ToolCallDelta], *, final: bool) -> None:
        index = self.started - 1
        if self._name is not None:  # streaming: the arguments may lack only the closing tag
            end = self._args_end
            trailer = body[end:] if end is not None else ""
            if end is None or trailer.strip() not in ("", "}"):
                raise InvalidToolCallError(
                    f"The model's call of `{self._name}` ended before its arguments did."
                )
            self._validate(self._name, body[self._args_at : end])
            self.calls += 1
            self._in_call = False
            return
        try:
            call = json.loads(body)
        except ValueError:
            raise InvalidToolCallError("The model wrote a tool call that is not JSON.") from None
        if not (isinstance(call, dict) and isinstance(call.get("name"), str)):
            raise InvalidToolCallError("The model wrote a tool call without a function name.")
        name, arguments = call["name"], call.get("arguments", {})
        self._check_name(name)
        if isinstance(arguments, str):  # some models write the arguments as a JSON string
            text = arguments
        else:
            text = json.dumps(arguments, ensure_ascii=False)
        self._validate(name, text)
        deltas.append(ToolCallDelta(index=index, id=self._new_id(), name=name, arguments=text))
        if final:
            self.calls += 1
            self._in_call = False

    def _end_call(self, rest: str) -> None:
        self.calls += 1
        self._in_call = False
        self._buf = rest + self._buf

    def _check_name(self, name: str) -> None:
        if name not in self._tools:
            raise InvalidToolCallError(f"The model called an unknown function `{name[:64]}`.")

    def _validate(self, name: str, arguments: str) -> None:
        try:
            value: Any = json.loads(arguments)
        except ValueError:
            raise InvalidToolCallError(
                f"The model called `{name}` with arguments that are not valid JSON."
            ) from None
        if not isinstance(value, dict):
            raise InvalidToolCallError(
                f"The model called `{name}` with arguments that are not a JSON object."
            )
        schema = arguments_schema(self._tools[name])
        try:
            error = jsonschema.exceptions.best_match(
                jsonschema.validators.validator_for(schema)(schema).iter_errors(value)
            )
        except jsonschema.exceptions.SchemaError:
            error = None  # the schema compiled to a grammar; its finer points are not checked
        if error is not None:
            raise InvalidToolCallError(
                f"The model called `{name}` with arguments that do not match its parameters: "
                f"{error.message[:200]}"
            )


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest end of `text` that begins `marker` (it may complete later)."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0
