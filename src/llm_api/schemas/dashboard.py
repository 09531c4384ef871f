"""Wire types of the dashboard routes: the admin's live server summary and a user's rate-limit
standing."""

from __future__ import annotations

from pydantic import BaseModel, Field


class TenantQueue(BaseModel):
    """One tenant's standing in a model's queue (fair queuing, docs/fair-sharing.md)."""

    tenant: str = Field(description="`team:<id>`, `user:<id>` or `anonymous`.")
    tier: str
    running: int
    waiting: int
    position: int | None = Field(
        description="Place of the tenant's next request in the queue (0 = next); null when "
        "none waits."
    )
    expected_wait_seconds: float | None = Field(
        description="Rough: places ahead × the average time a slot is held ÷ slots."
    )


class ModelLoad(BaseModel):
    id: str
    running: int = Field(description="Requests generating now.")
    waiting: int = Field(description="Requests queued for a generation slot.")
    slots: int = Field(description="Requests the model generates at once.")
    max_waiting: int = Field(description="Queue bound; beyond it requests get 503.")
    tenants: list[TenantQueue] = Field(
        default_factory=list, description="Tenants with requests running or waiting."
    )


class ServerSummary(BaseModel):
    """One worker's view (each gunicorn worker has its own gates and metric values)."""

    models: list[ModelLoad]
    requests_running: int
    requests_waiting: int
    tokens_per_second: float = Field(
        description="Completion tokens per second over the last `window_seconds`, counted from "
        "the `llm_api:generation_tokens` metric (which counts a request when it ends)."
    )
    completion_tokens_total: int = Field(description="Completion tokens since start.")
    prompt_tokens_total: int = Field(description="Prompt tokens since start.")
    window_seconds: float
    uptime_seconds: int
    draining: bool


class LimitStanding(BaseModel):
    name: str = Field(description="rpm, tpm, tpd or concurrency.")
    description: str
    scope: str = Field(description="What the limit counts: the user (all keys) or one key.")
    limit: int
    remaining: int | None = Field(description="Left now; null when the store cannot say.")
    reset_seconds: float | None = Field(description="Until the window is back to full.")


class LimitsStanding(BaseModel):
    tier: str
    enabled: bool = Field(description="False when the server enforces no rate limits.")
    limits: list[LimitStanding]
