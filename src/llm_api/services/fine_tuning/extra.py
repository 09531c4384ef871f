"""Whether the optional training dependencies (`llm-api[finetune]`: torch, transformers,
peft) are installed. Without them the server runs as before and the fine-tuning endpoints
answer a 400 saying what to install."""

from __future__ import annotations

import importlib.util

from llm_api.core.exceptions import InvalidRequestError

REQUIRED = ("torch", "transformers", "peft")


def available() -> bool:
    try:
        return all(importlib.util.find_spec(name) is not None for name in REQUIRED)
    except (ImportError, ValueError):  # a broken or half-removed install counts as absent
        return False


def require() -> None:
    if not available():
        raise InvalidRequestError(
            "Fine-tuning is not available on this server: it needs the optional training "
            "dependencies (pip install 'llm-api[finetune]', or requirements/finetune.txt).",
            code="fine_tuning_unavailable",
        )
