"""`system_fingerprint` for local models: names the backend configuration that produced an
answer, so a client can tell when a deterministic request (a seed, temperature 0) may start
answering differently.

It changes with the weights (the GGUF's first MiB, where its metadata lives, and its size),
the llama.cpp build, this server's version, and the engine settings that change logits
(engine, flash attention, batch size). Upstream and routed models get none of ours: their
upstream's own describes them, and OpenAI's spec lets the field be left out.
"""

from __future__ import annotations

import hashlib
import importlib.metadata

from llm_api.services.llm.registry import ModelConfig, Registry

_HEAD = 1 << 20


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:  # run from a source tree
        return "source"


def model_fingerprint(config: ModelConfig) -> str:
    """`fp_` and ten hex digits, like OpenAI's."""
    h = hashlib.sha256()
    try:
        path = config.weights_file()
        with path.open("rb") as f:
            h.update(f.read(_HEAD))
        h.update(str(path.stat().st_size).encode())
    except (OSError, ValueError):
        # Not there (yet): the backend will refuse to load it; the spec stands in.
        h.update((config.gguf or config.weights or config.id).encode())
    for part in (
        _version("llama_cpp_python"),
        _version("llm-api"),
        config.engine,
        str(config.flash_attn),
        str(config.n_batch),
    ):
        h.update(b"\0" + part.encode())
    return "fp_" + h.hexdigest()[:10]


def fingerprints(registry: Registry) -> dict[str, str]:
    """The fingerprint of each local chat model, computed once (at service construction)."""
    return {
        m.id: model_fingerprint(m)
        for m in registry.models
        if m.backend == "llama_cpp" and m.kind == "chat"
    }
