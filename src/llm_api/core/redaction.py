"""A structlog processor that keeps secrets out of logs.

Hand-written because no maintained structlog add-on does this: it masks values under secret-named
keys (authorization, password, api_key, token, ...) at any depth, and masks anything that looks
like one of our API keys, a bearer credential or a JWT inside any string, including formatted
exception text. Prompts never reach the logs in the first place: nothing logs request bodies.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, MutableMapping
from typing import Any

MASK = "[REDACTED]"

# Key names whose values are secrets. `prompt_tokens`/`completion_tokens` are counts, not
# secrets: the pattern matches a whole word `token`, never `tokens`.
_SECRET_KEY = re.compile(
    r"(^|[_-])(authorization|password|passwd|secret|api[_-]?key|token|cookie|set-cookie|"
    r"credentials?|jwt)$",
    re.IGNORECASE,
)
_SECRET_TEXT = re.compile(
    r"sk-[A-Za-z0-9_-]{6,}"  # our keys (sk-llmapi-...) and OpenAI-style upstream keys
    r"|(?i:bearer|basic)\s+[A-Za-z0-9._~+/=-]{6,}"  # Authorization header values
    r"|eyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]*"  # JWTs
)


def redact_text(text: str) -> str:
    return _SECRET_TEXT.sub(MASK, text)


def _redact(value: Any, depth: int = 0) -> Any:
    if depth > 6:
        return value
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, bytes):
        return redact_text(value.decode("utf-8", "replace"))
    if isinstance(value, Mapping):
        return {
            k: MASK if isinstance(k, str) and _SECRET_KEY.search(k) else _redact(v, depth + 1)
            for k, v in value.items()
        }
    if isinstance(value, list | tuple):
        return [_redact(v, depth + 1) for v in value]
    return value


def redact_secrets(_: Any, __: str, event_dict: MutableMapping[str, Any]) -> dict[str, Any]:
    """structlog processor: run it last before rendering, after exceptions are formatted."""
    redacted: dict[str, Any] = _redact(event_dict)
    return redacted
