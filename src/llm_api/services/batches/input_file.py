"""Validation of batch input files (JSONL, one request per line).

Every line is checked at upload with the same wire types as the HTTP API, so a batch never
fails later on a line we could have refused; errors name their line numbers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson
from pydantic import ValidationError

from llm_api.core.exceptions import APIError, InvalidRequestError
from llm_api.schemas.chat import ChatCompletionRequest
from llm_api.schemas.common import OpenAIRequest
from llm_api.schemas.completions import CompletionRequest
from llm_api.schemas.embeddings import EmbeddingRequest

ENDPOINT_TYPES: dict[str, type[OpenAIRequest]] = {
    "/v1/chat/completions": ChatCompletionRequest,
    "/v1/completions": CompletionRequest,
    "/v1/embeddings": EmbeddingRequest,
}
MAX_REPORTED_ERRORS = 20


@dataclass(slots=True)
class BatchLine:
    line: int
    custom_id: str
    url: str
    body: dict[str, Any]


def parse_line(raw: bytes, number: int) -> BatchLine:
    """One line → BatchLine, or a ValueError whose message names what is wrong."""
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise ValueError("not valid JSON") from None
    if not isinstance(obj, dict):
        raise ValueError("each line must be a JSON object")
    custom_id = obj.get("custom_id")
    if not isinstance(custom_id, str) or not 1 <= len(custom_id) <= 128:
        raise ValueError("`custom_id` must be a string of 1 to 128 characters")
    if obj.get("method") != "POST":
        raise ValueError("`method` must be POST")
    url = obj.get("url")
    if url not in ENDPOINT_TYPES:
        raise ValueError(f"`url` must be one of {sorted(ENDPOINT_TYPES)}")
    body = obj.get("body")
    if not isinstance(body, dict):
        raise ValueError("`body` must be a JSON object")
    if body.get("stream"):
        raise ValueError("`body.stream` is not allowed in a batch")
    try:
        ENDPOINT_TYPES[url].model_validate(body)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err.get("loc", ()))
        raise ValueError(f"invalid body{f' at {where}' if where else ''}: {err['msg']}") from None
    except APIError as exc:
        raise ValueError(f"invalid body: {exc.message}") from None
    return BatchLine(number, custom_id, url, body)


def validate_input(data: bytes, *, max_lines: int) -> int:
    """Check a whole file; return its number of requests or raise a 400 listing bad lines."""
    errors: list[str] = []
    seen: set[str] = set()
    urls: set[str] = set()
    count = 0
    for number, raw in enumerate(data.splitlines(), start=1):
        if not raw.strip():
            continue
        count += 1
        if count > max_lines:
            raise InvalidRequestError(f"The file has more than {max_lines} requests.", param="file")
        try:
            line = parse_line(raw, number)
        except ValueError as exc:
            errors.append(f"line {number}: {exc}")
        else:
            if line.custom_id in seen:
                errors.append(f"line {number}: duplicate custom_id {line.custom_id!r}")
            seen.add(line.custom_id)
            urls.add(line.url)
        if len(errors) >= MAX_REPORTED_ERRORS:
            break
    if not errors and len(urls) > 1:
        errors.append("all lines must use the same `url`")
    if errors:
        raise InvalidRequestError(
            "Invalid batch input file: " + "; ".join(errors), param="file", code="invalid_file"
        )
    if count == 0:
        raise InvalidRequestError("The file contains no requests.", param="file")
    return count


def iter_lines(data: bytes) -> list[BatchLine]:
    """Lines of an already-validated file."""
    return [
        parse_line(raw, number)
        for number, raw in enumerate(data.splitlines(), start=1)
        if raw.strip()
    ]
