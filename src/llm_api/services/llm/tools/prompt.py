"""How tools and tool-call history reach a local model's prompt.

A template that knows tools (it reads a `tools` variable and writes calls as
`<tool_call>{json}</tool_call>`, as Qwen2.5 and Hermes-2/3 do) renders them itself: the
request's tools and each assistant message's `tool_calls` are passed to it, the format the
model was trained on.

Any other template (SmolLM2's is plain ChatML) gets the same format from us, written into the
messages before the template runs: the tools' JSON signatures in the system message, calls as
`<tool_call>` blocks in the assistant's content, results as `<tool_response>` blocks in a user
turn. It is the most widespread open format (Hermes, Qwen, many fine-tunes), so small models
have often seen it, and its opener is a plain string that a grammar can be triggered on. Being
message content, all of it is tokenized without special tokens (see chat_template).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from llm_api.services.llm.types import Message, ToolCall, ToolSpec

CALL_OPEN = "<tool_call>"
CALL_CLOSE = "</tool_call>"
# What every constrained call starts with; a lazy grammar only engages on a prefix of this.
CALL_HEAD = CALL_OPEN + '\n{"name": '


def template_supports_tools(source: str) -> bool:
    """The template renders tools and writes calls in the `<tool_call>` format we parse."""
    return "tools" in source and CALL_OPEN in source


def tool_signature(tool: ToolSpec) -> dict[str, Any]:
    function: dict[str, Any] = {"name": tool.name}
    if tool.description:
        function["description"] = tool.description
    function["parameters"] = tool.parameters or {"type": "object", "properties": {}}
    return {"type": "function", "function": function}


def tools_system_text(tools: Sequence[ToolSpec], *, required: bool) -> str:
    signatures = "\n".join(json.dumps(tool_signature(t), ensure_ascii=False) for t in tools)
    must = "You must call" if required else "You may call"
    return (
        "# Tools\n\n"
        f"{must} one or more of these functions. Their JSON signatures are inside "
        f"<tools></tools>:\n<tools>\n{signatures}\n</tools>\n\n"
        "To call a function, write a JSON object with its name and arguments inside "
        "<tool_call></tool_call>:\n"
        f'{CALL_OPEN}\n{{"name": <function-name>, "arguments": <arguments-json-object>}}\n'
        f"{CALL_CLOSE}"
    )


def arguments_value(arguments: str) -> Any:
    """A history call's arguments as a JSON value: parsed when they parse, else the string."""
    try:
        return json.loads(arguments)
    except ValueError:
        return arguments


def call_text(call: ToolCall) -> str:
    body = json.dumps(
        {"name": call.name, "arguments": arguments_value(call.arguments)}, ensure_ascii=False
    )
    return f"{CALL_OPEN}\n{body}\n{CALL_CLOSE}"


def fallback_messages(
    messages: Sequence[Message], tools: Sequence[ToolSpec] | None, *, required: bool = False
) -> list[Message]:
    """The conversation with tools, calls and results written in as text (see module doc).
    `tools` None: none are offered (tool_choice none), but earlier calls still render."""
    out: list[Message] = []
    for m in messages:
        if m.role == "tool":
            block = f"<tool_response>\n{m.content}\n</tool_response>"
            prev = out[-1] if out else None
            if (
                prev is not None
                and prev.role == "user"
                and prev.content.startswith("<tool_response>")
            ):  # results of one turn's parallel calls share a user turn
                out[-1] = Message("user", f"{prev.content}\n{block}")
            else:
                out.append(Message("user", block))
        elif m.role == "assistant" and m.tool_calls:
            parts = [m.content] if m.content else []
            parts += [call_text(c) for c in m.tool_calls]
            out.append(Message("assistant", "\n".join(parts)))
        else:
            out.append(Message(m.role, m.content))
    if tools:
        text = tools_system_text(tools, required=required)
        if out and out[0].role in ("system", "developer"):
            out[0] = Message(out[0].role, f"{out[0].content}\n\n{text}")
        else:
            out.insert(0, Message("system", text))
    return out


def native_tools(tools: Sequence[ToolSpec]) -> list[dict[str, Any]]:
    return [tool_signature(t) for t in tools]


def native_tool_calls(calls: Sequence[ToolCall]) -> list[dict[str, Any]]:
    """Calls as tool-aware templates read them: arguments as an object (they `tojson` it)."""
    return [
        {
            "id": c.id,
            "type": "function",
            "function": {"name": c.name, "arguments": arguments_value(c.arguments)},
        }
        for c in calls
    ]
