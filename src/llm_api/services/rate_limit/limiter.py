"""The rate limiter: one atomic check per request before it reaches a model, settlement to the
real token count when it ends (however it ends), and the Redis-failure policy.

Wiring: the lifespan builds it (`build_rate_limiter`) and hands it to `build_pipeline`
(services/llm/pipeline.py): `admit_completion` is the admission stage's check (before
tokenization and the model's admission gate), `on_completion` its first subscriber. Key
creation calls `check_route`; login attempts go through `login` (login.py).

Redis failures (`LLM_API_RATE_LIMIT_FAILURE_MODE`):
- `local` (default): each process enforces its share of every limit (limit ÷ processes) in
  memory, with a warning in the log, until Redis answers again. Never unlimited.
- `open`: admit without limits (warning in the log).
- `closed`: refuse with 503 and Retry-After.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import structlog

from llm_api.core.config import Settings
from llm_api.core.exceptions import ServiceUnavailableError
from llm_api.core.ids import new_request_id
from llm_api.core.metrics import RATE_LIMIT_REJECTIONS
from llm_api.services.llm.types import CompletionRecord, RequestContext

# A module, not its names: money.budgets imports rate_limit.types (a cycle through the package).
from llm_api.services.money import budgets as money
from llm_api.services.rate_limit.headers import (
    budget_headers,
    budget_rejection,
    rate_limit_headers,
    rejection,
)
from llm_api.services.rate_limit.login import LoginPolicy, LoginThrottle
from llm_api.services.rate_limit.memory_store import MemoryStore, StoreFull
from llm_api.services.rate_limit.policy import LimitPolicy
from llm_api.services.rate_limit.redis_store import RedisStore, StoreUnavailable
from llm_api.services.rate_limit.types import Decision, LimitSpec, Settlement, Store
from llm_api.services.redis_pool import SharedRedis

log = structlog.get_logger(__name__)


def _refuse_if_rejected(
    specs: list[LimitSpec], decision: Decision, headers: dict[str, str]
) -> None:
    """Raise the 429 for the limit that refused (and count it), if one did."""
    if not decision.allowed:
        spec = specs[decision.rejected or 0]
        _count_rejection(spec)
        if spec.kind == "budget":
            raise budget_rejection(spec, decision, headers)
        raise rejection(spec, decision, headers)


def _count_rejection(spec: LimitSpec) -> None:
    # A short fixed set of labels (scope_rule: user_rpm, ip_tpm, team_budget, ...), never an id.
    RATE_LIMIT_REJECTIONS.labels(limit=f"{spec.scope}_{spec.name}").inc()


def _memory_full(full: StoreFull) -> ServiceUnavailableError:
    return ServiceUnavailableError(
        "Rate limiting is at capacity; retry shortly.",
        retry_after=max(1, -(-full.retry_ms // 1000)),
    )


@dataclass(slots=True)
class _Ticket:
    store: Store
    admitted_ms: int
    tokens: list[LimitSpec]
    leases: list[LimitSpec]
    # Budgets: what each charge became in the store that admitted it (the local fallback
    # scales limits), and the charge (rule, period) for the soft-limit alerts.
    budgets: list[tuple[LimitSpec, money.BudgetCharge]]


class RateLimiter:
    MAX_UNSETTLED = 100_000
    RECONCILE_S = 0.5

    def __init__(
        self,
        policy: LimitPolicy,
        store: Store,
        *,
        failure_mode: str = "local",
        processes: int = 1,
        enabled: bool = True,
        login: LoginThrottle | None = None,
        memory_max_keys: int = 100_000,
        budgets: money.BudgetBook | None = None,
    ) -> None:
        self.policy = policy
        # Money (services/money/budgets.py): charged in the same script as the token limits,
        # and enforced whether or not the rate limits are.
        self.budgets = budgets or money.BudgetBook()
        self.store = store
        self.failure_mode = failure_mode
        self.processes = max(1, processes)
        self.enabled = enabled
        # The local fallback (a MemoryStore as primary needs none: it cannot fail).
        self.fallback = MemoryStore(memory_max_keys) if isinstance(store, RedisStore) else None
        self._tickets: dict[str, _Ticket] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._renewer: asyncio.Task[None] | None = None
        self._degraded = False
        # Login attempts: growing delays per (account, client), not windows (login.py).
        self.login = login
        # Settlements (and so releases of concurrency slots) that Redis did not take, and
        # admissions whose reply never came (to void), retried until Redis takes them: dropped,
        # each would hold its slot there for the whole lease.
        self._unsettled: dict[str, Callable[[], Awaitable[object]]] = {}
        self._reconciler: asyncio.Task[None] | None = None
        self._redis_back = asyncio.Event()

    # --- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        self._renewer = asyncio.create_task(self._renew_leases(), name="rate-limit-leases")

    async def aclose(self) -> None:
        for task in (self._renewer, self._reconciler):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=2)
        if self._unsettled:  # one last try, so a clean restart leaves no slot held
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(2):
                    await self._settle_deferred()
        await self.store.aclose()

    @property
    def in_flight(self) -> int:
        """Requests admitted by this process and not yet settled."""
        return len(self._tickets)

    # --- admission ------------------------------------------------------------------------------

    async def _decide(
        self, request_id: str, specs: list[LimitSpec]
    ) -> tuple[Decision | None, Store, list[LimitSpec]]:
        try:
            decision = await self.store.admit(request_id, specs)
        except StoreUnavailable as exc:
            if exc.sent and isinstance(self.store, RedisStore):
                # It may have run, or may yet (delivered late): undo it once Redis answers.
                self._defer(
                    f"void:{request_id}", functools.partial(self.store.void, request_id, specs)
                )
            return self._degrade(request_id, specs)
        except StoreFull as full:
            raise _memory_full(full) from None
        if self._degraded:
            self._degraded = False
            log.warning("rate_limit_redis_recovered")
        if self._unsettled:
            self._redis_back.set()  # settle what failed during the outage now
        return decision, self.store, specs

    def _degrade(
        self, request_id: str, specs: list[LimitSpec]
    ) -> tuple[Decision | None, Store, list[LimitSpec]]:
        if not self._degraded:
            self._degraded = True
            log.warning("rate_limit_degraded", mode=self.failure_mode, processes=self.processes)
        if self.failure_mode == "closed":
            raise ServiceUnavailableError(
                "Rate limiting is temporarily unavailable; retry shortly.", retry_after=1
            )
        if self.failure_mode == "open" or self.fallback is None:
            return None, self.store, specs
        shared = [spec.scaled(self.processes) for spec in specs]
        try:
            return self.fallback.admit_now(request_id, shared), self.fallback, shared
        except StoreFull as full:
            raise _memory_full(full) from None

    async def admit_completion(
        self, ctx: RequestContext, tokens: int, cost: int = 0
    ) -> dict[str, str]:
        """Check and take every limit of this request, or raise 429 (or 503 when closed).
        `tokens` is the reservation: prompt tokens + max_tokens of every choice; `cost` its
        price in nano-dollars, reserved against the request's budgets in the same call.
        Returns the x-ratelimit-* (and budget) headers the response carries."""
        specs = self.policy.for_completion(ctx, tokens) if self.enabled else []
        if ctx.batch_id is not None:
            # Batch lines are paced by the batch worker, not per-minute limits; the owner's
            # daily token quota still applies.
            specs = [s for s in specs if s.name == "tpd" and s.scope == "user"]
        charges = self.budgets.charges(ctx, cost) if not self.budgets.empty else []
        specs += [c.spec for c in charges]
        if not specs:
            return {}
        decision, store, specs = await self._decide(ctx.request_id, specs)
        if decision is None:
            return {}
        headers = rate_limit_headers(specs, decision)
        if charges:
            headers.update(budget_headers(specs, decision, [c.rule.soft_nanos for c in charges]))
        _refuse_if_rejected(specs, decision, headers)
        self._tickets[ctx.request_id] = _Ticket(
            store,
            decision.now_ms,
            [s for s in specs if s.metric == "tokens"],
            [s for s in specs if s.kind == "concurrency"],
            list(zip([s for s in specs if s.kind == "budget"], charges, strict=True)),
        )
        return headers

    async def check_route(self, route: str, client_ip: str | None, account: str | None) -> None:
        """Limits of routes without a model (`login`, `key_creation`): 429 when exceeded."""
        if not self.enabled:
            return
        if account is not None:  # no e-mail addresses in Redis keys
            account = hashlib.sha256(account.strip().lower().encode()).hexdigest()[:32]
        specs = self.policy.for_route(route, client_ip, account)
        if not specs:
            return
        decision, _, specs = await self._decide(new_request_id(), specs)
        if decision is not None:
            _refuse_if_rejected(specs, decision, {})

    async def admit_request(self, ctx: RequestContext) -> dict[str, str]:
        """A request without a model that is still work (a batch created, a file uploaded):
        it counts against the caller's requests-per-minute limits like a completion does,
        or raises 429. It takes no token reservation and no concurrency slot. Returns the
        x-ratelimit-* headers the response carries."""
        if not self.enabled:
            return {}
        specs = [s for s in self.policy.for_completion(ctx, 0) if s.metric == "requests"]
        if not specs:
            return {}
        decision, _, specs = await self._decide(ctx.request_id, specs)
        if decision is None:
            return {}
        headers = rate_limit_headers(specs, decision)
        _refuse_if_rejected(specs, decision, headers)
        return headers

    # --- settlement -----------------------------------------------------------------------------

    def on_completion(self, record: CompletionRecord) -> None:
        """The pipeline's first subscriber: settle the reservation to the real usage and free
        the slot.

        Synchronous on purpose: it runs in the `finally` of a request that may be being
        cancelled (client gone), where any await would be cancelled too. The Redis call runs as
        its own task instead."""
        ticket = self._tickets.pop(record.request_id, None)
        if ticket is None:
            return
        used = record.prompt_tokens + record.completion_tokens
        if record.status >= 500 and record.completion_tokens == 0:
            used = 0  # the server failed before generating: do not charge the caller
        settlements = [Settlement(spec, spec.cost, used) for spec in ticket.tokens]
        # Money: the real cost (cancelled streams pay for what was generated; a failure of
        # ours before any output costs nothing, see stages._cost).
        settlements += [
            Settlement(spec, spec.cost, record.cost_nanos) for spec, _ in ticket.budgets
        ]
        if isinstance(ticket.store, MemoryStore):
            totals = ticket.store.settle_now(record.request_id, settlements, ticket.leases)
            self._budgets_settled(ticket, totals)
            return
        task = asyncio.get_running_loop().create_task(
            self._settle(record.request_id, ticket, settlements)
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _settle(
        self, request_id: str, ticket: _Ticket, settlements: list[Settlement]
    ) -> None:
        try:
            totals = await ticket.store.settle(
                request_id, ticket.admitted_ms, settlements, ticket.leases
            )
            self._budgets_settled(ticket, totals)
        except StoreUnavailable:
            log.warning("rate_limit_settle_deferred", request_id=request_id)
            self._defer(
                request_id,
                functools.partial(
                    ticket.store.settle, request_id, ticket.admitted_ms, settlements, ticket.leases
                ),
            )
        except Exception:
            log.exception("rate_limit_settle_error", request_id=request_id)

    def _budgets_settled(self, ticket: _Ticket, totals: list[int]) -> None:
        for (_, charge), total in zip(ticket.budgets, totals, strict=False):
            if total >= 0:
                self.budgets.settled(charge, total)

    def _defer(self, key: str, call: Callable[[], Awaitable[object]]) -> None:
        """Keep a call Redis did not take (settle or void: both idempotent), to retry once it
        answers. Bounded: beyond MAX_UNSETTLED the oldest goes (its lease has long lapsed)."""
        if len(self._unsettled) >= self.MAX_UNSETTLED:
            self._unsettled.pop(next(iter(self._unsettled)))
        self._unsettled[key] = call
        if self._reconciler is None or self._reconciler.done():
            self._reconciler = asyncio.get_running_loop().create_task(
                self._reconcile(), name="rate-limit-reconcile"
            )

    async def _reconcile(self) -> None:
        """Retry the deferred settlements: as soon as an admission reaches Redis again, else
        every RECONCILE_S (a try while Redis is marked down costs nothing, and one while it is
        unreachable costs one timeout before it is marked down again)."""
        while self._unsettled:
            self._redis_back.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._redis_back.wait(), self.RECONCILE_S)
            await self._settle_deferred()

    async def _settle_deferred(self) -> None:
        settled = 0
        for key, call in list(self._unsettled.items()):
            try:
                await call()
            except StoreUnavailable:
                break  # still unreachable: the rest wait for the next try
            except Exception:
                log.exception("rate_limit_settle_error", request_id=key)
            self._unsettled.pop(key, None)
            settled += 1
        if settled:
            log.warning("rate_limit_settlements_reconciled", settled=settled)

    async def _renew_leases(self) -> None:
        """Keep the concurrency leases of long requests alive (one script call per tick for
        all of this process's requests); a crashed process stops renewing and its leases lapse."""
        interval = self.policy.lease_ms / 3000
        while True:
            await asyncio.sleep(interval)
            by_store: dict[int, tuple[Store, list[tuple[str, LimitSpec]]]] = {}
            for rid, ticket in list(self._tickets.items()):
                entry = by_store.setdefault(id(ticket.store), (ticket.store, []))
                entry[1].extend((rid, spec) for spec in ticket.leases)
            for store, leases in by_store.values():
                try:
                    await store.renew(leases)
                except StoreUnavailable:
                    pass
                except Exception:
                    log.exception("rate_limit_renew_error")


def build_rate_limiter(
    settings: Settings, redis: SharedRedis | None, budgets: money.BudgetBook | None = None
) -> RateLimiter:
    """The shared Redis when there is one (LLM_API_REDIS_URL), else this process's memory."""
    policy = LimitPolicy.from_settings(settings)
    store: Store
    if redis is not None:
        timeout = settings.rate_limit_redis_timeout_ms / 1000
        store = RedisStore(redis.client, settings.rate_limit_key_prefix, timeout, redis.health)
    else:
        store = MemoryStore(settings.rate_limit_memory_max_keys)
        if settings.workers > 1 and settings.rate_limit_enabled:
            log.warning(
                "rate_limit_memory_with_workers",
                workers=settings.workers,
                detail="without LLM_API_REDIS_URL each worker enforces the limits on its own, "
                "so clients get up to workers × the limit; set LLM_API_REDIS_URL",
            )
    login = LoginThrottle(
        LoginPolicy.from_settings(settings),
        store if isinstance(store, RedisStore) else None,
        settings.rate_limit_failure_mode,
    )
    return RateLimiter(
        policy,
        store,
        failure_mode=settings.rate_limit_failure_mode,
        processes=settings.workers * settings.rate_limit_replicas,
        enabled=settings.rate_limit_enabled,
        login=login,
        memory_max_keys=settings.rate_limit_memory_max_keys,
        budgets=budgets,
    )
