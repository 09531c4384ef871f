"""Training files: chat-format JSONL, one example per line, checked before a job starts.

Each line is `{"messages": [...]}` with system/user/assistant messages of plain text, ending
with the assistant answer the model learns (earlier turns are context). Errors name their line
and what to change, as OpenAI's file validation does; lengths are counted with the model's own
chat template and tokenizer (the ones serving uses), so what fits here fits at inference.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import orjson

from llm_api.core.exceptions import InvalidRequestError
from llm_api.services.llm.types import Message

ROLES = ("system", "developer", "user", "assistant")
MAX_REPORTED_ERRORS = 20
MIN_EXAMPLES = 1


@dataclass(frozen=True, slots=True)
class Example:
    line: int
    context: list[Message]  # every message before the answer
    answer: str  # the final assistant message's content


@dataclass(frozen=True, slots=True)
class TokenizedExample:
    prompt: list[int]  # the chat template's rendering of the context, generation prompt included
    answer: list[int]  # the answer's tokens and the end-of-turn token (what the loss covers)

    def __len__(self) -> int:
        return len(self.prompt) + len(self.answer)


def _parse_line(raw: bytes) -> tuple[list[Message], str]:
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise ValueError("not valid JSON") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("messages"), list):
        raise ValueError('each line must be a JSON object with a "messages" array')
    messages: list[Message] = []
    for i, m in enumerate(obj["messages"]):
        if not isinstance(m, dict):
            raise ValueError(f"messages[{i}] must be an object")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            hint = " (tool calls cannot be trained on the local model)" if role == "tool" else ""
            raise ValueError(f"messages[{i}].role must be one of {', '.join(ROLES)}{hint}")
        if m.get("tool_calls") or m.get("function_call"):
            raise ValueError(f"messages[{i}]: tool calls cannot be trained on the local model")
        if not isinstance(content, str):
            raise ValueError(f"messages[{i}].content must be a string")
        messages.append(Message(role, content))
    if not messages:
        raise ValueError('"messages" is empty')
    if messages[-1].role != "assistant" or not messages[-1].content.strip():
        raise ValueError("the last message must be a non-empty assistant message (the answer)")
    if not any(m.role == "user" for m in messages[:-1]):
        raise ValueError("an example needs at least one user message before the answer")
    return messages, messages[-1].content


def parse_examples(
    data: bytes, *, max_examples: int, param: str = "training_file"
) -> list[Example]:
    """Every example of a file, or a 400 listing the bad lines (up to 20)."""
    errors: list[str] = []
    examples: list[Example] = []
    for number, raw in enumerate(data.splitlines(), start=1):
        if not raw.strip():
            continue
        if len(examples) + len(errors) >= max_examples:
            raise InvalidRequestError(
                f"The file has more than {max_examples} examples.", param=param
            )
        try:
            messages, answer = _parse_line(raw)
        except ValueError as exc:
            errors.append(f"line {number}: {exc}")
            if len(errors) >= MAX_REPORTED_ERRORS:
                break
            continue
        examples.append(Example(number, messages[:-1], answer))
    if errors:
        raise InvalidRequestError(
            "Invalid fine-tuning file: " + "; ".join(errors), param=param, code="invalid_file"
        )
    if len(examples) < MIN_EXAMPLES:
        raise InvalidRequestError("The file contains no examples.", param=param)
    return examples


class Tokenizer:
    """The model's tokenizer and chat template (llama.cpp, vocabulary only: no weights)."""

    def __init__(self, gguf: Path) -> None:
        import llama_cpp
        from llama_cpp import _internals

        from llm_api.services.llm.backends import llama_log
        from llm_api.services.llm.chat_template import ChatTemplate, template_from_metadata

        llama_cpp.llama_backend_init()
        llama_log.install()
        params = llama_cpp.llama_model_default_params()
        params.vocab_only = True
        self._model = _internals.LlamaModel(path_model=str(gguf), params=params, verbose=False)
        model = self._model
        self.eos = model.token_eos()
        self._bos = model.token_bos()
        self._add_bos = bool(model.add_bos_token())
        piece: Callable[[int], str] = lambda t: (  # noqa: E731
            bytes(model.detokenize([t], special=True)).decode("utf-8", "replace") if t >= 0 else ""
        )
        self.template = ChatTemplate(
            template_from_metadata(model.metadata()),
            bos_token=piece(self._bos),
            eos_token=piece(self.eos),
        )

    def tokenize(self, text: str, *, special: bool = False) -> list[int]:
        return list(self._model.tokenize(text.encode("utf-8"), False, special))

    def encode(self, example: Example) -> TokenizedExample:
        from llm_api.services.llm.chat_template import tokenize_pieces

        pieces = self.template.render_pieces(example.context)
        prompt = tokenize_pieces(
            pieces, self._model.tokenize, add_bos=self._add_bos, bos_id=self._bos
        )
        # The answer as the engine would produce it, then end-of-turn: where generation stops.
        return TokenizedExample(prompt, [*self.tokenize(example.answer), self.eos])

    def decode(self, tokens: list[int]) -> str:
        return bytes(self._model.detokenize(tokens, special=True)).decode("utf-8", "replace")


@lru_cache(maxsize=4)
def tokenizer_for(gguf: Path) -> Tokenizer:
    return Tokenizer(gguf)


def tokenize_examples(
    examples: list[Example], tokenizer: Tokenizer, *, max_tokens: int, param: str
) -> list[TokenizedExample]:
    """Tokenized examples, or a 400 naming each one too long for training (or the context)."""
    out: list[TokenizedExample] = []
    errors: list[str] = []
    for ex in examples:
        tokenized = tokenizer.encode(ex)
        if len(tokenized) > max_tokens:
            errors.append(
                f"line {ex.line}: {len(tokenized)} tokens, more than the {max_tokens} an "
                "example may have; shorten it or split the conversation"
            )
            if len(errors) >= MAX_REPORTED_ERRORS:
                break
        out.append(tokenized)
    if errors:
        raise InvalidRequestError(
            "Invalid fine-tuning file: " + "; ".join(errors), param=param, code="invalid_file"
        )
    return out


def summary(examples: list[TokenizedExample]) -> dict[str, Any]:
    return {"examples": len(examples), "tokens": sum(len(e) for e in examples)}
