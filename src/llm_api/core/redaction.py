"""A structlog processor that keeps secrets out of logs.

Hand-written because no maintained structlog add-on does this: it masks values under secret-named
keys (authorization, password, api_key, refresh_token, refreshToken, ...) in mappings, lists,
sets, pydantic models and dataclasses at any depth (what lies deeper than any structure we log
is masked whole), and inside any string, including formatted exception text and the repr() of
other objects, it masks our API keys and refresh tokens, bearer credentials, JWTs,
`password=...`-style assignments and the password in a URL. Prompts never reach the logs in the
first place: nothing logs request bodies.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, MutableMapping
from functools import lru_cache
from typing import Any

from pydantic import BaseModel

MASK = "[REDACTED]"
_MAX_DEPTH = 12  # deeper than any structure we log; what lies below is masked, not printed

# Key names whose values are secrets: the key, lower-cased without separators, ends with one of
# these (`refresh_token`, `refreshToken`, `X-Api-Key`, `new_password`, `client_secret`). Counts
# are not secrets: `prompt_tokens` ends with `tokens`, not `token`.
_SECRET_KEY_ENDINGS = (
    "authorization",
    "password",
    "passwd",
    "passphrase",
    "pwd",
    "secret",
    "apikey",
    "token",
    "cookie",
    "credential",
    "credentials",
    "jwt",
    "privatekey",
    "dsn",
)
_KEY_SEPARATORS = str.maketrans("", "", "_-. ")
_SECRET_TEXT = re.compile(
    r"sk-[A-Za-z0-9_-]{6,}"  # our keys (sk-llmapi-...) and OpenAI-style upstream keys
    r"|rt-llmapi-[A-Za-z0-9_-]{6,}"  # our refresh tokens
    r"|(?i:bearer|basic)\s+[A-Za-z0-9._~+/=-]{6,}"  # Authorization header values
    r"|eyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]*"  # JWTs
)
# A name followed by `=` or `:` inside text (query strings, repr() of objects, exception
# messages): `password=hunter2`, `"refresh_token": "rt-..."`, `?api_key=...`. The value is masked
# when the name is secret-named (is_secret_key). Names start where a run of letters starts, so
# the scan stays linear on long strings.
_NAME = re.compile(
    r"(?<![A-Za-z_-])([A-Za-z_-]+)"  # a name
    r"['\"]?\s*[:=]\s*['\"]?"  # then = or :, quoted or not
)
_VALUE = re.compile(r"(?!\[REDACTED\])[^\s'\"&,;)}\]]+")  # its value, unless already masked
# The password in a URL's userinfo: postgresql://user:PASSWORD@host/db, redis://:PASSWORD@host.
_URL_PASSWORD = re.compile(r"(://[^\s:/@]*:)[^\s@/]+@")


@lru_cache(maxsize=1024)  # asked for every field of every line; the same few names repeat
def is_secret_key(key: str) -> bool:
    return key.lower().translate(_KEY_SEPARATORS).endswith(_SECRET_KEY_ENDINGS)


def _mask_assignments(text: str) -> str:
    # By hand rather than one sub(): a name that is not secret must not consume what follows it
    # (`failed: password=...` holds two names).
    out: list[str] = []
    pos = 0
    for name in _NAME.finditer(text):
        if name.start() < pos or not is_secret_key(name.group(1)):
            continue
        value = _VALUE.match(text, name.end())
        if value is None:
            continue
        out += (text[pos : name.end()], MASK)
        pos = value.end()
    return "".join(out) + text[pos:] if out else text


def redact_text(text: str) -> str:
    text = _SECRET_TEXT.sub(MASK, text)
    if "=" in text or ":" in text:  # most fields (ids, paths, names) have neither
        text = _mask_assignments(text)
        text = _URL_PASSWORD.sub(rf"\1{MASK}@", text)
    return text


def _redact(value: Any, depth: int = 0) -> Any:
    if value is None or isinstance(value, bool | int | float):
        return value
    if depth > _MAX_DEPTH:
        return MASK
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, bytes):
        return redact_text(value.decode("utf-8", "replace"))
    if isinstance(value, Mapping):
        return {
            k: MASK if isinstance(k, str) and is_secret_key(k) else _redact(v, depth + 1)
            for k, v in value.items()
        }
    if isinstance(value, list | tuple | set | frozenset):
        return [_redact(v, depth + 1) for v in value]
    if isinstance(value, BaseModel):  # its fields by name, so secret-named ones are masked
        return _redact(value.model_dump(mode="json"), depth + 1)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _redact(dataclasses.asdict(value), depth + 1)
    # Anything else renders through repr() (as structlog's renderers would): redact that text.
    return redact_text(repr(value))


def redact(value: Any) -> Any:
    """`value` with secrets masked as in the logs (secret-named keys, credentials inside text):
    for what is stored rather than logged, such as the audit log's settings snapshot."""
    return _redact(value)


# Written by our own processors (core/logging.py), never from input: not worth a scan per line.
_OWN_FIELDS = frozenset({"timestamp", "level", "logger"})


def redact_secrets(_: Any, __: str, event_dict: MutableMapping[str, Any]) -> dict[str, Any]:
    """structlog processor: run it last before rendering, after exceptions are formatted."""
    return {
        k: v
        if k in _OWN_FIELDS and isinstance(v, str)
        else MASK
        if is_secret_key(k)
        else _redact(v, 1)
        for k, v in event_dict.items()
    }
