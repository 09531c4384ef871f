"""Pieces shared by the OpenAI-compatible request and response types."""

from __future__ import annotations

import json
import re
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    StringConstraints,
    model_serializer,
    model_validator,
)

from llm_api.core.exceptions import InvalidRequestError

# Fields that decide where a request is sent or with which secret. They are set by the operator in
# the model registry; a client that sends them anywhere in the body gets a 400 (SSRF / key theft).
FORBIDDEN_FIELDS = frozenset(
    {"api_base", "base_url", "api_key", "api_version", "callback_url", "webhook_url", "proxy"}
)
MAX_JSON_DEPTH = 64
# Beyond any model's context window, and within the 32-bit integers every upstream parses.
MAX_TOKENS = 2**31 - 1
# Fields no request type declares that we refuse rather than ignore (a declared field, such as
# chat's `tools` or `logprobs`, is the request type's own business).
UNSUPPORTED_FIELDS = (
    "logprobs",
    "top_logprobs",
    "logit_bias",
    "best_of",
    "echo",
    "suffix",
    "tools",
    "functions",
    "function_call",
)


def reject_forbidden_fields(data: Any) -> None:
    """Walk a decoded JSON body; raise on a routing/secret field at any depth (`param` is its
    path, as `messages[0].metadata.base_url`), on nesting deeper than MAX_JSON_DEPTH, or on text
    that is not valid Unicode (a lone UTF-16 surrogate such as `"\\ud800"`, which JSON's
    escapes allow but UTF-8 cannot encode: it would fail wherever the text is encoded, in the
    tokenizer, an upstream's body or a log line)."""
    found = _find_forbidden(data, 0)
    if found is None:
        return
    problem, parts = found
    path = ""
    for part in reversed(parts):
        if isinstance(part, str):
            part = _printable(part)
        path = f"{path}[{part}]" if isinstance(part, int) else f"{path}.{part}" if path else part
    if problem == _TOO_DEEP:
        raise InvalidRequestError("Request body is nested too deeply.", param=path or None)
    if problem == _SURROGATE:
        raise InvalidRequestError(
            f"`{path}` is not valid Unicode: it holds a lone UTF-16 surrogate (such as "
            "`\\ud800`), which cannot be encoded as UTF-8.",
            param=path,
        )
    raise InvalidRequestError(
        f"`{problem}` cannot be set by a client; upstreams are configured by the operator.",
        param=path,
    )


_TOO_DEEP = "too deep"
_SURROGATE = "surrogate"
_SURROGATES = re.compile("[\ud800-\udfff]")


def _bad_text(text: str) -> bool:
    # isascii() is a flag check in CPython: almost every string costs nothing more.
    return not text.isascii() and _SURROGATES.search(text) is not None


def _printable(text: str) -> str:
    """A key as it can be put in an error message (lone surrogates written as `\\udXXX`)."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _find_forbidden(data: Any, depth: int) -> tuple[str, list[str | int]] | None:
    """The first problem (a forbidden key, _TOO_DEEP or _SURROGATE) and its path, innermost
    part first. Only dicts, lists and non-ASCII strings cost anything, and the path is only made
    for a finding: this runs on every request."""
    if depth > MAX_JSON_DEPTH:
        return _TOO_DEEP, []
    if isinstance(data, dict):
        for key, value in data.items():
            if isinstance(key, str):
                if key.lower() in FORBIDDEN_FIELDS:
                    return key, [key]
                if _bad_text(key):
                    return _SURROGATE, [key]
            if isinstance(value, str):
                if _bad_text(value):
                    return _SURROGATE, [str(key)]
            elif isinstance(value, dict | list):
                found = _find_forbidden(value, depth + 1)
                if found is not None:
                    found[1].append(str(key))
                    return found
    elif isinstance(data, list):
        for i, value in enumerate(data):
            if isinstance(value, str):
                if _bad_text(value):
                    return _SURROGATE, [i]
            elif isinstance(value, dict | list):
                found = _find_forbidden(value, depth + 1)
                if found is not None:
                    found[1].append(i)
                    return found
    elif isinstance(data, str) and _bad_text(data):
        return _SURROGATE, []
    return None


class StrictModel(BaseModel):
    """Wire types reject wrong JSON types ("0.5" for a float) and NaN/Infinity."""

    model_config = ConfigDict(strict=True, allow_inf_nan=False, extra="allow")


class OpenAIRequest(StrictModel):
    """Base for request bodies: unknown fields are tolerated (SDKs send extras) but routing
    fields never are."""

    @model_validator(mode="before")
    @classmethod
    def _no_routing_fields(cls, data: Any) -> Any:
        reject_forbidden_fields(data)
        return data


StopStr = Annotated[str, StringConstraints(min_length=1, max_length=256)]


class StreamOptions(StrictModel):
    include_usage: bool = False


class JSONSchemaFormat(StrictModel):
    name: Annotated[str, StringConstraints(max_length=64)] = "response"
    description: str | None = None
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None

    @model_validator(mode="after")
    def _bounded(self) -> JSONSchemaFormat:
        if len(json.dumps(self.schema_)) > 64_000:
            raise ValueError("json_schema.schema is too large (64 kB max)")
        return self


class ResponseFormat(StrictModel):
    type: Literal["text", "json_object", "json_schema"] = "text"
    json_schema: JSONSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_present(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("response_format.json_schema is required when type is json_schema")
        return self


class SamplingFields(OpenAIRequest):
    """Sampling parameters common to chat and text completions."""

    model: Annotated[str, StringConstraints(min_length=1, max_length=256)]
    max_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, ge=0.0, le=1.0)
    stop: StopStr | list[StopStr] | None = None
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1)
    n: int = Field(1, ge=1)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    user: Annotated[str, StringConstraints(max_length=256)] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def reject_unsupported(self) -> None:
        """Features we do not implement fail loudly instead of being silently ignored."""
        extra = self.model_extra or {}
        for name in UNSUPPORTED_FIELDS:
            value = extra.get(name)
            if value and not (name == "best_of" and value == 1):
                raise InvalidRequestError(f"`{name}` is not supported by this server.", param=name)


class ResponseModel(BaseModel):
    """Base for response bodies: fields an upstream sent that we do not declare pass through
    (`extra="allow"`), and the optional fields named in `OMIT_NONE` are left out rather than sent
    as null (OpenAI's spec has them absent, or a string, never null)."""

    model_config = ConfigDict(extra="allow")
    OMIT_NONE: ClassVar[frozenset[str]] = frozenset()

    @model_serializer(mode="wrap")
    def _omit_none(self, handler: SerializerFunctionWrapHandler):  # type: ignore[no-untyped-def]
        # No return annotation: the serialization schema (OpenAPI) stays the model's fields.
        data = handler(self)
        if self.OMIT_NONE and isinstance(data, dict):
            for key in self.OMIT_NONE:
                if key in data and data[key] is None:
                    del data[key]
        return data


class PromptTokensDetails(ResponseModel):
    cached_tokens: int | None = None


class Usage(ResponseModel):
    OMIT_NONE = frozenset({"prompt_tokens_details", "completion_tokens_details", "cost"})

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    # What the request cost in USD (as OpenRouter reports it): the model's prices × the tokens
    # used; 0 for unpriced models and cache hits (docs/usage.md).
    cost: float | None = None
    # Prompt tokens served from a reused prefix; an upstream's details come through verbatim.
    prompt_tokens_details: PromptTokensDetails | None = None
    completion_tokens_details: dict[str, Any] | None = None


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody
