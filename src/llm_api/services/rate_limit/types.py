"""What the limiter checks (one `LimitSpec` per limit a request is subject to) and what a store
answers (`Decision`). Shared by the Redis and the in-memory store so they behave the same."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal, Protocol

Kind = Literal["window", "concurrency", "budget"]
Metric = Literal["requests", "tokens", "concurrency", "cost"]

# The most one limit, reservation or settled usage may count. Lua (the Redis scripts) computes
# in doubles, exact for integers below 2**53: capped here, a window's sum stays exact, and no
# number is ever written in exponent notation (1e+15) that the scripts could not read back.
MAX_UNITS = 10**15


def units(value: int) -> int:
    """`value` as a count the stores can hold exactly: an integer in [0, MAX_UNITS]."""
    return min(max(int(value), 0), MAX_UNITS)


@dataclass(frozen=True, slots=True)
class LimitSpec:
    """One limit on one subject: e.g. tokens per minute of user u_1.

    `window` limits are sliding logs: at most `limit` units of cost in any `period_ms`.
    `concurrency` limits are leases: at most `limit` requests hold one, each lease lasting
    `period_ms` unless renewed (so a crashed worker's slots come back by themselves).
    `budget` limits are money (nano-dollars) spent in one calendar period: a counter of what
    was spent plus what is reserved, refusing a request whose reservation (`cost`) would take
    it past `limit`; `period_ms` is the time left in the period (the subject names the period,
    so a new one starts from 0), and outstanding reservations are kept per request id so that
    settlement is idempotent. `floor` (budgets only) is the period's spend in the usage ledger
    when the rules were last loaded: a store that has no counter for the period (Redis lost its
    data, a restarted embedded server) starts it from there, never from 0; an existing counter
    is never lowered."""

    name: str  # the rule, short and fixed: rpm, tpm, tpd, concurrency, login, key_creation
    label: str  # for people: "tokens per minute (TPM)"
    scope: str  # key, user, ip, account
    subject: str
    kind: Kind
    metric: Metric
    limit: int
    period_ms: int
    cost: int = 1
    floor: int = 0

    def __post_init__(self) -> None:
        # Every count a store sees is exact (MAX_UNITS), whoever built the spec.
        object.__setattr__(self, "limit", units(self.limit))
        object.__setattr__(self, "cost", units(self.cost))
        object.__setattr__(self, "floor", units(self.floor))

    @property
    def key(self) -> str:
        return f"{self.scope}:{self.subject}:{self.name}"

    def scaled(self, divisor: int) -> LimitSpec:
        """This limit shared among `divisor` processes (the local fallback), never below 1. A
        budget's share is of what its floor leaves (each process's counter starts there)."""
        share = -(-max(0, self.limit - self.floor) // divisor)
        return replace(self, limit=max(1, self.floor + share))


@dataclass(slots=True)
class LimitState:
    remaining: int  # after this request, when it was admitted
    reset_ms: int  # until the window (or the slots) are back to their full limit


@dataclass(slots=True)
class Decision:
    allowed: bool
    now_ms: int  # the store's clock at admission (settlement finds the entries by it)
    states: list[LimitState] = field(default_factory=list)
    rejected: int | None = None  # index of the limit that refused
    retry_ms: int = 0


@dataclass(frozen=True, slots=True)
class Settlement:
    """Real usage of a token limit, replacing the reservation made at admission."""

    spec: LimitSpec
    reserved: int
    used: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "reserved", units(self.reserved))
        object.__setattr__(self, "used", units(self.used))


class Store(Protocol):
    """Checks all of one request's limits and takes them all, or none, atomically."""

    async def admit(self, request_id: str, specs: list[LimitSpec]) -> Decision: ...

    async def settle(
        self,
        request_id: str,
        admitted_ms: int,
        settlements: list[Settlement],
        leases: list[LimitSpec],
    ) -> list[int]:
        """Settle; returns each budget settlement's total after it (in order; -1 when the
        reservation was settled before), for the soft-limit alerts."""
        ...

    async def renew(self, leases: list[tuple[str, LimitSpec]]) -> None: ...

    async def aclose(self) -> None: ...
