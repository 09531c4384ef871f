"""Per-model prices and what a request costs.

Prices are USD per million tokens, as providers publish them. Internally every amount of money
is an integer number of nano-dollars (1e-9 USD): a price of p USD per million tokens is exactly
p × 1000 nano-dollars per token, so with prices of at most three decimal places (checked) a
request's cost is an exact integer and sums of costs never drift. Floats appear only at the
edge, in a response's `usage.cost`.
"""

from __future__ import annotations

import functools
from decimal import Decimal

from pydantic import BaseModel, ConfigDict, Field, field_validator

NANOS_PER_USD = 10**9
_NANOS_PER_TOKEN = 1000  # per (USD per million tokens)
# Limits of any one price: far above every real one, and small enough that a request's cost
# stays an exact integer in the rate limiter's Lua scripts (doubles).
MAX_PRICE = Decimal(100_000)


def usd(nanos: int) -> float:
    """Nano-dollars as the USD float a response's `usage.cost` carries."""
    return nanos / NANOS_PER_USD


def usd_decimal(nanos: int) -> Decimal:
    """Nano-dollars as an exact Decimal of USD (reports, budgets)."""
    return Decimal(nanos) / NANOS_PER_USD


def usd_text(nanos: int) -> str:
    """Nano-dollars as an exact decimal string of USD: `12.5`, `0.000000007`, `0`."""
    text = f"{usd_decimal(nanos):f}"
    return text.rstrip("0").rstrip(".") if "." in text else text


def nanos_of(amount: Decimal) -> int:
    """USD (at most 9 decimal places) as nano-dollars."""
    value = amount * NANOS_PER_USD
    if value != value.to_integral_value():
        raise ValueError("amounts of money have at most 9 decimal places")
    return int(value)


class Pricing(BaseModel):
    """A model's prices, USD per million tokens. Local models cost 0 unless configured."""

    model_config = ConfigDict(extra="forbid")

    input: Decimal = Field(Decimal(0), ge=0, le=MAX_PRICE, description="Prompt tokens.")
    cached_input: Decimal | None = Field(
        None,
        ge=0,
        le=MAX_PRICE,
        description="Prompt tokens served from a cached prefix; default: the input price.",
    )
    output: Decimal = Field(Decimal(0), ge=0, le=MAX_PRICE, description="Completion tokens.")
    training: Decimal = Field(
        Decimal(0), ge=0, le=MAX_PRICE, description="Tokens trained by a fine-tuning job."
    )

    @field_validator("input", "cached_input", "output", "training", mode="before")
    @classmethod
    def _exact(cls, v: object) -> object:
        # YAML hands floats: 0.15 must mean 0.15, not the binary float nearest to it.
        return Decimal(str(v)) if isinstance(v, float) else v

    @field_validator("input", "cached_input", "output", "training")
    @classmethod
    def _three_places(cls, v: Decimal | None) -> Decimal | None:
        if v is not None and (v * _NANOS_PER_TOKEN) != (v * _NANOS_PER_TOKEN).to_integral_value():
            raise ValueError("prices have at most 3 decimal places (USD per million tokens)")
        return v

    @property
    def free(self) -> bool:
        return not (self.input or self.output or self.cached_input)

    def per_token(self) -> tuple[int, int, int]:
        """(input, cached input, output) in nano-dollars per token."""
        return self._per_token

    @functools.cached_property
    def _per_token(self) -> tuple[int, int, int]:
        # Computed once: every request prices itself twice (reservation and cost), and Decimal
        # arithmetic there showed in the gateway's per-request CPU (bench.gateway_instructions).
        # Prices are set when the registry loads and never change afterwards.
        cached = self.input if self.cached_input is None else self.cached_input
        return (
            int(self.input * _NANOS_PER_TOKEN),
            int(cached * _NANOS_PER_TOKEN),
            int(self.output * _NANOS_PER_TOKEN),
        )

    def cost(self, prompt_tokens: int, cached_tokens: int, completion_tokens: int) -> int:
        """What a request used, in nano-dollars: uncached prompt tokens at the input price,
        cached ones at the cached price, completion tokens at the output price."""
        inp, cached_price, out = self.per_token()
        cached = min(max(cached_tokens, 0), max(prompt_tokens, 0))
        return (prompt_tokens - cached) * inp + cached * cached_price + completion_tokens * out

    def training_cost(self, trained_tokens: int) -> int:
        """A fine-tuning job's cost in nano-dollars: every token it trained (each epoch's)."""
        return trained_tokens * int(self.training * _NANOS_PER_TOKEN)


FREE = Pricing()
