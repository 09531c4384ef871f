"""Chat templates from GGUF metadata, rendered safely.

Two defences:
- The template is rendered in Jinja's ImmutableSandboxedEnvironment: a GGUF file is untrusted
  input, and a template such as `{{ lipsum.__globals__['os'].popen('id') }}` must fail with
  SecurityError instead of running (llama-cpp-python CVE-2024-34359).
- Message contents never pass through the tokenizer's special-token parser. Each content is
  swapped for a marker before rendering; afterwards the template's own text is tokenized with
  special tokens enabled and the contents with them disabled, so a user typing
  `<|im_start|>system` gets plain text, not a control token.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from jinja2 import StrictUndefined, TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from llm_api.services.llm.tools.prompt import native_tool_calls
from llm_api.services.llm.types import Message

# Used when a GGUF carries no template: ChatML, which SmolLM2 and many others use.
CHATML_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + "
    "message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


class TemplateRenderError(ValueError):
    pass


def _raise_exception(message: str) -> None:
    raise TemplateRenderError(message)


@dataclass(frozen=True, slots=True)
class PromptPiece:
    text: str
    is_content: bool  # True: user-controlled text, tokenized without special tokens


class ChatTemplate:
    def __init__(self, source: str, *, bos_token: str = "", eos_token: str = "") -> None:
        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, undefined=StrictUndefined
        )
        env.globals["raise_exception"] = _raise_exception
        self.source = source
        self._template = env.from_string(source)
        self._bos = bos_token
        self._eos = eos_token

    def render_pieces(
        self, messages: Sequence[Message], *, tools: list[dict[str, Any]] | None = None
    ) -> list[PromptPiece]:
        """`tools` (OpenAI's `tools` array) only for templates that render tools themselves;
        then assistant calls and tool results are passed to it too (see llm/tools/prompt)."""
        # A random tag per render, so content cannot forge a marker.
        tag = secrets.token_hex(8)
        marker = re.compile(rf"\x00{tag}:(\d+)\x00")
        placeholders: list[dict[str, Any]] = [
            {"role": m.role if m.role != "developer" else "system", "content": f"\x00{tag}:{i}\x00"}
            for i, m in enumerate(messages)
        ]
        extra: dict[str, Any] = {}
        if tools is not None:
            extra["tools"] = tools
            for m, p in zip(messages, placeholders, strict=True):
                if m.tool_calls:
                    p["tool_calls"] = native_tool_calls(m.tool_calls)
                if m.tool_call_id is not None:
                    p["tool_call_id"] = m.tool_call_id
                if m.name is not None:
                    p["name"] = m.name
        try:
            rendered = self._template.render(
                messages=placeholders,
                add_generation_prompt=True,
                bos_token=self._bos,
                eos_token=self._eos,
                **extra,
            )
        except TemplateError as exc:  # includes SecurityError
            raise TemplateRenderError(f"chat template failed: {exc}") from exc
        pieces: list[PromptPiece] = []
        pos = 0
        for match in marker.finditer(rendered):
            if match.start() > pos:
                pieces.append(PromptPiece(rendered[pos : match.start()], False))
            pieces.append(PromptPiece(messages[int(match.group(1))].content, True))
            pos = match.end()
        if pos < len(rendered):
            pieces.append(PromptPiece(rendered[pos:], False))
        return pieces

    def render_text(self, messages: Sequence[Message]) -> str:
        return "".join(p.text for p in self.render_pieces(messages))


def tokenize_pieces(
    pieces: Sequence[PromptPiece],
    tokenize: Callable[[bytes, bool, bool], list[int]],
    *,
    add_bos: bool,
    bos_id: int,
) -> list[int]:
    """`tokenize(text_bytes, add_bos, special)` is llama_cpp.Llama.tokenize's signature."""
    tokens: list[int] = [bos_id] if add_bos and bos_id >= 0 else []
    for piece in pieces:
        if piece.text:
            tokens.extend(tokenize(piece.text.encode("utf-8"), False, not piece.is_content))
    return tokens


def template_from_metadata(metadata: dict[str, Any]) -> str:
    return str(metadata.get("tokenizer.chat_template") or CHATML_TEMPLATE)
