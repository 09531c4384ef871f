"""What the lifespan builds and every request shares. Handed out through api/deps.py."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from llm_api.core.config import Settings
from llm_api.services.llm.service import LLMService


@dataclass
class AppState:
    settings: Settings
    llm: LLMService
    draining: bool = False
    extras: dict[str, Any] = field(default_factory=dict)
