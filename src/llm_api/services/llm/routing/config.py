"""Registry types for routed models: the deployments behind one model id and the policy that
picks among them. Kept free of runtime imports so that the registry can import it."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

Strategy = Literal["weighted_random", "least_inflight", "lowest_latency"]


class DeploymentConfig(BaseModel):
    """One replica serving a routed model: an OpenAI-compatible upstream (`base_url`) or a
    local model of this registry (`model`)."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    name: str | None = Field(None, description="Label in logs and breaker keys (default: index).")
    weight: float = Field(1.0, gt=0, description="Share of traffic under weighted_random.")
    model: str | None = Field(None, description="Id of a local (llama_cpp) model to route to.")
    base_url: str | None = None
    api_key_env: str | None = Field(
        None, description="Name of the environment variable holding the upstream key."
    )
    upstream_model: str | None = None
    connect_timeout: float = Field(5.0, gt=0)
    first_token_timeout: float = Field(60.0, gt=0)
    idle_timeout: float = Field(30.0, gt=0)
    max_connections: int = Field(100, ge=1)

    @field_validator("base_url")
    @classmethod
    def _http_only(cls, v: str | None) -> str | None:
        if v is not None and not v.startswith(("http://", "https://")):
            raise ValueError("base_url must be an http(s) URL")
        return v.rstrip("/") if v else v

    @model_validator(mode="after")
    def _one_target(self) -> DeploymentConfig:
        if (self.model is None) == (self.base_url is None):
            raise ValueError("a deployment needs exactly one of `base_url` or `model`")
        return self


class RoutingPolicy(BaseModel):
    """How a routed model picks a deployment, retries, and trips its circuit breakers."""

    model_config = ConfigDict(extra="forbid")

    strategy: Strategy = "weighted_random"
    retries: int = Field(2, ge=0, le=10, description="Extra attempts before the first byte.")
    backoff_base: float = Field(0.05, ge=0, description="First retry delay in seconds.")
    backoff_max: float = Field(2.0, ge=0, description="Largest retry delay in seconds.")
    max_retry_after: float = Field(
        5.0, ge=0, description="Longest upstream Retry-After we wait for; longer fails at once."
    )
    latency_alpha: float = Field(
        0.3, gt=0, le=1, description="EWMA weight of the newest time-to-first-token sample."
    )
    breaker_failures: int = Field(5, ge=1, description="Consecutive failures that open a breaker.")
    breaker_cooldown: float = Field(30.0, gt=0, description="Seconds open before a probe.")
    health_check_interval: float | None = Field(
        None, gt=0, description="Seconds between active GET <base_url>/models checks (off: None)."
    )
