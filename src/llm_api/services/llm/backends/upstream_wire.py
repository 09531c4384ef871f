"""What an OpenAI-compatible upstream is sent, and what of its answer goes beyond plain text.

The request: the client's body as it came (`GenerationRequest.wire`), with only the model name,
the stream settings and the per-choice fields replaced; so content parts, tools, logprobs,
response formats and anything a newer SDK sends reach the upstream unchanged. Without `wire`
(/v1/generate, batch lines) the body is rebuilt from the request's fields.

The answer: `openai_upstream` reads plain text on its fast path; a read with tool-call pieces,
reasoning, logprobs or delta fields we do not interpret is decoded as plain JSON and assembled
here into `Frame`s, field by field, without loss (`Rich`). The same converters read a
non-streamed answer.
"""

from __future__ import annotations

from typing import Any

from llm_api.services.llm.registry import ModelConfig
from llm_api.services.llm.types import (
    FinishReason,
    Frame,
    GenerationRequest,
    TokenLogprob,
    ToolCallDelta,
    TopLogprob,
)

# OpenAI's request fields, chat and legacy completions. Others (an SDK's `extra_body`) reach the
# upstream only where its registry entry says `forward_unknown_fields`: they may mean anything
# to one server and be refused by another.
KNOWN_FIELDS = frozenset(
    {
        "audio", "best_of", "echo", "frequency_penalty", "function_call", "functions",
        "logit_bias", "logprobs", "max_completion_tokens", "max_tokens", "messages",
        "metadata", "modalities", "model", "n", "parallel_tool_calls", "prediction",
        "presence_penalty", "prompt", "prompt_cache_key", "reasoning_effort", "response_format",
        "safety_identifier", "seed", "service_tier", "stop", "store", "stream", "stream_options",
        "suffix", "temperature", "tool_choice", "tools", "top_logprobs", "top_p", "user",
        "verbosity", "web_search_options",
    }
)  # fmt: skip


def request_body(config: ModelConfig, request: GenerationRequest) -> tuple[str, dict[str, Any]]:
    """The upstream path and JSON body for one sequence (one choice) of a request."""
    wire = request.wire
    if wire is None:
        return _rebuilt(config, request)
    p = request.params
    if config.forward_unknown_fields:
        body = dict(wire)
    else:
        body = {k: v for k, v in wire.items() if k in KNOWN_FIELDS}
    body["model"] = config.upstream_model or config.id
    # We always stream, with usage (usage feeds the limits and the ledger); a client's other
    # stream options (vLLM's continuous_usage_stats) stay.
    options = wire.get("stream_options")
    body["stream"] = True
    body["stream_options"] = {
        **(options if isinstance(options, dict) else {}),
        "include_usage": True,
    }
    # Each choice is its own upstream request (the service runs n of them at once), with its own
    # seed: seed + choice index, as for local models.
    body.pop("n", None)
    if p.seed is not None:
        body["seed"] = p.seed
    # The registry's defaults, where the client gave none.
    if "max_tokens" not in body and "max_completion_tokens" not in body:
        body["max_tokens"] = p.max_tokens
    body.setdefault("temperature", p.temperature)
    body.setdefault("top_p", p.top_p)
    if request.messages is not None:
        return "chat/completions", body
    # A completions body may list several prompts: each is its own sequence.
    body["prompt"] = request.prompt or ""
    return "completions", body


def _rebuilt(config: ModelConfig, request: GenerationRequest) -> tuple[str, dict[str, Any]]:
    p = request.params
    body: dict[str, Any] = {
        "model": config.upstream_model or config.id,
        "max_tokens": p.max_tokens,
        "temperature": p.temperature,
        "top_p": p.top_p,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if p.stop:
        body["stop"] = p.stop
    if p.seed is not None:
        body["seed"] = p.seed
    if p.presence_penalty:
        body["presence_penalty"] = p.presence_penalty
    if p.frequency_penalty:
        body["frequency_penalty"] = p.frequency_penalty
    if p.logprobs:
        body["logprobs"] = True
        if p.top_logprobs:
            body["top_logprobs"] = p.top_logprobs
    if p.json_schema is not None:
        body["response_format"] = (
            {"type": "json_object"}
            if not p.json_schema
            else {
                "type": "json_schema",
                "json_schema": {"name": "response", "schema": p.json_schema, "strict": True},
            }
        )
    if request.messages is None:
        body["prompt"] = request.prompt or ""
        return "completions", body
    messages: list[dict[str, Any]] = []
    for m in request.messages:
        msg: dict[str, Any] = {"role": m.role, "content": m.content}
        if m.tool_calls:
            msg["tool_calls"] = [
                {
                    "id": c.id,
                    "type": "function",
                    "function": {"name": c.name, "arguments": c.arguments},
                }
                for c in m.tool_calls
            ]
        if m.tool_call_id is not None:
            msg["tool_call_id"] = m.tool_call_id
        if m.name is not None:
            msg["name"] = m.name
        messages.append(msg)
    body["messages"] = messages
    if request.tools:
        body["tools"] = [
            _tool(t.name, t.parameters, t.description, t.strict) for t in request.tools
        ]
        body["tool_choice"] = (
            {"type": "function", "function": {"name": request.tool_name}}
            if request.tool_choice == "function"
            else request.tool_choice
        )
        body["parallel_tool_calls"] = request.parallel_tool_calls
    return "chat/completions", body


def _tool(name: str, parameters: dict[str, Any], description: str | None, strict: bool) -> Any:
    function: dict[str, Any] = {"name": name, "parameters": parameters}
    if description is not None:
        function["description"] = description
    if strict:
        function["strict"] = True
    return {"type": "function", "function": function}


# --- from plain JSON (the dict walk, non-streamed answers) ------------------------------------

# Delta (or message) fields read into a Frame's own fields; every other non-null one goes to
# `extra` as it came. A null says nothing the absence of the field does not.
READ_FIELDS = frozenset({"content", "role", "tool_calls", "reasoning_content", "reasoning"})


def dict_extra(delta: dict[str, Any]) -> dict[str, Any] | None:
    extra = {k: v for k, v in delta.items() if v is not None and k not in READ_FIELDS}
    return extra or None


def dict_reasoning(delta: dict[str, Any]) -> str | None:
    """`reasoning_content` (DeepSeek, vLLM), or `reasoning` (vLLM's newer name, Ollama)."""
    for key in ("reasoning_content", "reasoning"):
        value = delta.get(key)
        if value and type(value) is str:
            return value
    return None


def dict_calls(calls: Any) -> list[ToolCallDelta] | None:
    """Tool-call pieces (or whole calls) of any shape; what is not a call is skipped. A call
    without an `index` is numbered by its position (servers that send whole calls)."""
    if type(calls) is not list:
        return None
    out = []
    for position, c in enumerate(calls):
        if type(c) is not dict:
            continue
        index = c.get("index")
        if type(index) is not int or index < 0:
            index = position
        f = c.get("function")
        f = f if type(f) is dict else {}
        call_id, name, args = c.get("id"), f.get("name"), f.get("arguments")
        out.append(
            ToolCallDelta(
                index,
                call_id if type(call_id) is str else None,
                name if type(name) is str else None,
                args if type(args) is str else "",
            )
        )
    return out or None


def dict_logprobs(lp: Any) -> list[TokenLogprob] | None:
    """Chat's `{"content": [...]}`, or legacy completions' parallel lists."""
    if type(lp) is not dict:
        return None
    content = lp.get("content")
    if type(content) is list:
        found = [t for t in (_token(x) for x in content) if t is not None]
        return found or None
    tokens, values, tops = lp.get("tokens"), lp.get("token_logprobs"), lp.get("top_logprobs")
    if type(tokens) is not list or type(values) is not list:
        return None
    tops = tops if type(tops) is list else []
    out = []
    for i, (token, value) in enumerate(zip(tokens, values, strict=False)):
        if type(token) is not str or not _is_number(value):
            continue
        top = tops[i] if i < len(tops) and type(tops[i]) is dict else {}
        alternatives = [TopLogprob(k, float(v), None) for k, v in top.items() if _is_number(v)]
        out.append(TokenLogprob(token, float(value), None, alternatives))
    return out or None


def _token(x: Any) -> TokenLogprob | None:
    if type(x) is not dict or type(x.get("token")) is not str or not _is_number(x.get("logprob")):
        return None
    tops = x.get("top_logprobs")
    alternatives = [
        TopLogprob(a["token"], float(a["logprob"]), _bytes(a.get("bytes")))
        for a in (tops if type(tops) is list else ())
        if type(a) is dict and type(a.get("token")) is str and _is_number(a.get("logprob"))
    ]
    return TokenLogprob(x["token"], float(x["logprob"]), _bytes(x.get("bytes")), alternatives)


def _is_number(v: Any) -> bool:
    return type(v) is float or type(v) is int


def _bytes(v: Any) -> list[int] | None:
    return v if type(v) is list and all(type(b) is int for b in v) else None


def usage_extra(usage: dict[str, Any]) -> dict[str, Any] | None:
    """A usage object's details (prompt_tokens_details, completion_tokens_details, and whatever
    else an upstream reports), verbatim; the three counts are read on their own."""
    extra = {
        k: v
        for k, v in usage.items()
        if v is not None and k not in ("prompt_tokens", "completion_tokens", "total_tokens")
    }
    return extra or None


def cached_tokens(details: Any) -> int | None:
    """`prompt_tokens_details.cached_tokens`: of the prompt, the tokens served from a cache."""
    value = details.get("cached_tokens") if type(details) is dict else None
    return value if type(value) is int and value >= 0 else None


def finish_reason(reason: str | None) -> FinishReason:
    if reason in ("length", "tool_calls", "content_filter"):
        return reason  # type: ignore[return-value]
    return "stop"


class Rich:
    """One read's output beyond plain text, made only when a chunk carries some: the fast path
    never builds one. Text pieces stay in the read's `texts` list (shared with the fast path),
    so a read's text, reasoning, tool-call pieces and logprobs leave as one frame, in order
    within each field; tool-call pieces are kept one by one (ids, names, argument pieces and
    indices exactly as sent). A chunk with fields passed on verbatim (`extra`) gets a frame of
    its own: those cannot be merged without knowing what they mean."""

    __slots__ = ("texts", "frames", "reasoning", "tool_calls", "logprobs", "pieces")

    def __init__(self, texts: list[str]) -> None:
        self.texts = texts
        self.frames: list[Frame] = []
        self.reasoning: list[str] = []
        self.tool_calls: list[ToolCallDelta] = []
        self.logprobs: list[TokenLogprob] = []
        self.pieces = 0  # chunks with content but no text (each stands for a token)

    def add(
        self,
        text: str | None,
        reasoning: str | None,
        tool_calls: list[ToolCallDelta] | None,
        logprobs: list[TokenLogprob] | None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        if extra is not None:
            self._cut(None)
        if text:
            self.texts.append(text)
        elif reasoning or tool_calls or extra is not None:
            self.pieces += 1
        if reasoning:
            self.reasoning.append(reasoning)
        if tool_calls:
            self.tool_calls += tool_calls
        if logprobs:
            self.logprobs += logprobs
        if extra is not None:
            self._cut(extra)

    def _cut(self, extra: dict[str, Any] | None) -> None:
        texts = self.texts
        tokens = len(texts) + self.pieces
        if not tokens and extra is None and not self.logprobs:
            return
        self.frames.append(
            Frame(
                text="".join(texts),
                tokens=tokens,
                reasoning="".join(self.reasoning) or None,
                tool_calls=self.tool_calls or None,
                logprobs=self.logprobs or None,
                extra=extra,
            )
        )
        texts.clear()
        self.reasoning, self.tool_calls, self.logprobs, self.pieces = [], [], [], 0

    def close(self) -> list[Frame]:
        """The read's frames, in order."""
        self._cut(None)
        return self.frames
