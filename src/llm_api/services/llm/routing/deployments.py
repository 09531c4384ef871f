"""One deployment at run time: its backend plus what the strategies read (requests in flight,
recent time to first token) and the moment until which its upstream asked us to back off."""

from __future__ import annotations

import time
from dataclasses import dataclass

from llm_api.services.llm.backends.base import Backend
from llm_api.services.llm.routing.config import DeploymentConfig


@dataclass(slots=True, eq=False)
class Deployment:
    name: str
    config: DeploymentConfig
    backend: Backend
    local: bool  # a local model of this registry (its backend is shared, not owned)
    alpha: float = 0.3
    inflight: int = 0
    ttft_ewma: float | None = None
    # Monotonic time before which this deployment's own Retry-After asks us not to call it.
    retry_after_until: float = 0.0

    def observe_ttft(self, seconds: float) -> None:
        prev = self.ttft_ewma
        self.ttft_ewma = seconds if prev is None else prev + self.alpha * (seconds - prev)

    def cooling(self, now: float | None = None) -> bool:
        return (now if now is not None else time.monotonic()) < self.retry_after_until
