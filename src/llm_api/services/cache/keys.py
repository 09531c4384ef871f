"""Cache keys: SHA-256 over a canonical JSON of everything that decides a response.

The key covers the endpoint, the model id and its version (the GGUF file's size and mtime, or the
upstream's URL and model, plus the registry entry with its sampling defaults), the whole request
body (messages or prompt and every sampling parameter, including extras the SDK sends), and the
tenant. Presentation-only fields (`stream`, `stream_options`, `user`) are left out so a streaming
request can be answered from a non-streaming one and vice versa.

Tenant isolation (RELIABILITY #28): unless the operator makes the cache shared, the user id is part
of the key, so the same prompt from two tenants never shares an entry.
"""

from __future__ import annotations

import hashlib
from typing import Any

import orjson

from llm_api.services.llm.registry import ModelConfig

_PRESENTATION_FIELDS = frozenset({"stream", "stream_options", "user"})
KEY_SCHEMA = "v1"  # bump when the entry format or key recipe changes


def model_version(config: ModelConfig) -> str:
    """Identifies the weights and defaults behind a model id, so a swapped GGUF file or changed
    registry entry never serves answers cached from the old one. Size + mtime rather than a hash of
    the file: hashing a multi-GB GGUF at start would cost seconds to minutes."""
    parts: dict[str, Any] = {"config": config.model_dump(mode="json")}
    if config.backend == "llama_cpp":
        # The GGUF, or the weights a local embedding model is converted from at start.
        stat = config.weights_file().stat()
        parts["gguf"] = [stat.st_size, stat.st_mtime_ns]
    digest = hashlib.sha256(orjson.dumps(parts, option=orjson.OPT_SORT_KEYS)).hexdigest()
    return digest[:16]


def cache_key(
    *,
    endpoint: str,
    model: str,
    version: str,
    tenant: str,
    body: dict[str, Any],
) -> str:
    request = {k: v for k, v in body.items() if k not in _PRESENTATION_FIELDS}
    canonical = orjson.dumps(
        {
            "schema": KEY_SCHEMA,
            "endpoint": endpoint,
            "model": model,
            "version": version,
            "tenant": tenant,
            "request": request,
        },
        option=orjson.OPT_SORT_KEYS,
    )
    return hashlib.sha256(canonical).hexdigest()
