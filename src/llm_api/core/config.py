"""Application settings: one pydantic-settings class, read from `LLM_API_*` env vars and `.env`.

Every field has a description; `.env.example` documents each one. Validators fail fast at start so a
misconfigured server never comes up half-working.
"""

from __future__ import annotations

import ipaddress
import json
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from llm_api.core.rate_limits import DEFAULT_TIERS, TierLimits, merge_tiers
from llm_api.core.secret_strength import weakness

DEFAULT_JWT_SECRET = "dev-insecure-change-me"  # noqa: S105 - refused outside development


@lru_cache(maxsize=4096)  # asked for every request when auth is off; ip_address() is µs each
@lru_cache(maxsize=256)  # asked for every request when auth is off; few distinct hosts
def is_loopback_host(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="LLM_API_",
        env_file=".env",
        env_file_encoding="utf-8",
        # `LLM_API_X=` (as .env.example lists unset options) means "the default", not "" (which
        # an int, bool or path setting would reject or misread: an empty path is ".").
        env_ignore_empty=True,
        extra="ignore",
        # A validation error at start names the setting and the reason, never the value: the
        # input may be a secret (a JWT key, a database URL with its password).
        hide_input_in_errors=True,
    )

    # --- server -----------------------------------------------------------------------------
    environment: Literal["development", "production", "test"] = Field(
        "development", description="development relaxes secret checks; production enforces them."
    )
    host: str = Field("127.0.0.1", description="Bind address for `llm-api serve`.")
    port: int = Field(8000, ge=1, le=65535, description="Bind port for `llm-api serve`.")
    workers: int = Field(1, ge=1, description="Worker processes for `llm-api serve`.")
    data_dir: Path = Field(
        Path("data"), description="Directory for the SQLite database, uploaded files and buffers."
    )
    log_level: str = Field("INFO", description="Root log level.")
    log_json: bool | None = Field(
        None, description="JSON logs (default: on in production, readable text in development)."
    )

    # --- models -----------------------------------------------------------------------------
    models_file: Path | None = Field(
        None,
        description="YAML or TOML model registry. Unset: the built-in registry (embedded SmolLM2).",
    )
    model_cache_dir: Path = Field(
        Path("~/.cache/llm-api"),
        description="Where models converted at first start are kept (the built-in embedding "
        "model's GGUF, ~45 MiB); outside the repository, shared by workers.",
    )
    llama_threads: int | None = Field(
        None,
        ge=1,
        description="CPU threads for in-process llama.cpp models (default: the CPUs this "
        "process may use: its affinity, capped by a cgroup CPU quota).",
    )
    warmup: bool = Field(True, description="Run one short generation per local model at start.")

    # --- request limits ---------------------------------------------------------------------
    max_body_bytes: int = Field(
        1024 * 1024, ge=1024, description="Largest accepted request body; larger gets 413."
    )
    max_messages: int = Field(256, ge=1, description="Most messages in one chat request.")
    max_message_chars: int = Field(
        200_000, ge=1, description="Longest single message or prompt, in characters."
    )
    max_stop_sequences: int = Field(4, ge=1, le=64, description="Most stop sequences.")
    max_n: int = Field(4, ge=1, le=16, description="Largest `n` (choices per request).")
    embedding_upstream_batch: int = Field(
        256,
        ge=1,
        le=2048,
        description="Most inputs per embeddings call to an upstream; a larger request is split "
        "(each part routed, retried and bounded on its own).",
    )
    sse_keepalive_seconds: float = Field(
        15.0, gt=0, description="Interval of SSE keep-alive comments on idle streams."
    )
    fast_path: bool = Field(
        True,
        description="Serve the completion routes through api/fastpath (a shorter route "
        "handler, a stream response with fewer sends, response heads written with their "
        "first body bytes). Off: FastAPI's, Starlette's and uvicorn's stock code, same answers.",
    )

    # --- storage ----------------------------------------------------------------------------
    database_url: str | None = Field(
        None,
        description="SQLAlchemy async URL (postgresql+asyncpg://...). Unset: SQLite in data_dir.",
    )
    db_pool_size: int = Field(10, ge=1, description="PostgreSQL pool size.")
    db_max_overflow: int = Field(20, ge=0, description="PostgreSQL pool overflow.")
    db_pool_pre_ping: bool = Field(True, description="Check connections before use.")
    db_pool_recycle: int = Field(3600, ge=1, description="Recycle connections after N seconds.")
    db_auto_migrate: bool = Field(
        False,
        description="Run database migrations at start for PostgreSQL too (SQLite always does).",
    )
    redis_url: str | None = Field(
        None, description="Redis URL for limits, cache and queues. Unset: in-process memory."
    )
    breaker_redis_timeout_ms: int = Field(
        100,
        ge=5,
        le=5000,
        description="Timeout of each circuit-breaker call to Redis; slower falls back to this "
        "process's own breaker state.",
    )

    # --- response cache and usage records ---------------------------------------------------
    cache_enabled: bool = Field(
        True, description="Cache deterministic responses (temperature 0 or an explicit seed)."
    )
    cache_ttl_seconds: int = Field(3600, ge=1, description="Lifetime of a cached response.")
    cache_shared: bool = Field(
        False, description="Share cached responses across users (else one cache per user)."
    )
    cache_max_bytes: int = Field(
        64 * 1024 * 1024, ge=1024, description="Byte bound of the in-process cache (no Redis)."
    )
    cache_timeout_ms: float = Field(
        100.0, gt=0, le=1000, description="Redis cache call timeout; slower means a miss."
    )
    usage_flush_interval_seconds: float = Field(
        1.0, gt=0, description="How often buffered usage records are written to the database."
    )
    usage_fsync_interval_seconds: float = Field(
        0.2, gt=0, description="How often the usage buffer file is fsync'd (batched)."
    )
    usage_max_backoff_seconds: float = Field(
        5.0, gt=0, description="Longest wait between retries while the database is unreachable."
    )
    conversation_log: bool = Field(
        False, description="Store each prompt and response (users can opt out)."
    )
    conversation_retention_days: int = Field(
        30, ge=1, description="Stored conversations older than this are deleted."
    )

    # --- batch jobs -------------------------------------------------------------------------
    batch_max_file_bytes: int = Field(
        50 * 1024 * 1024, ge=1024, description="Largest batch input file (bytes)."
    )
    batch_max_lines: int = Field(50_000, ge=1, description="Most requests in one batch file.")
    batch_concurrency: int = Field(
        4, ge=1, le=64, description="Requests of one batch that run at once."
    )
    batch_embedded_worker: bool | None = Field(
        None,
        description="Run batches inside the API process (default: only when no Redis is set).",
    )
    # Per-user quotas (OpenAI caps an organisation's stored files at 100 GB and answers 400;
    # a self-hosted server is smaller). Exceeding one is a 400 in the OpenAI error shape.
    files_max_bytes_per_user: int = Field(
        1024 * 1024 * 1024,
        ge=1024,
        description="Most bytes of files one user may store (uploads and batch results).",
    )
    files_max_count_per_user: int = Field(
        1000, ge=1, description="Most files one user may store (uploads and batch results)."
    )
    batch_max_active_per_user: int = Field(
        10, ge=1, description="Most batches of one user not yet finished (queued or running)."
    )
    batch_lease_seconds: float = Field(
        6.0,
        ge=2,
        le=300,
        description="A batch worker's lease, renewed every sixth of it while the worker lives: "
        "how soon another worker resumes the batch of one that died.",
    )

    # --- security ---------------------------------------------------------------------------
    auth_enabled: bool = Field(
        True, description="Require credentials. May be false only when binding to loopback."
    )
    jwt_secret: str = Field(
        DEFAULT_JWT_SECRET,
        description="HS256 signing key, >= 32 characters outside development; production "
        "refuses example and guessable values (generate one: `openssl rand -hex 32`).",
    )
    jwt_issuer: str = Field("llm-api", description="JWT `iss` claim.")
    jwt_audience: str = Field("llm-api", description="JWT `aud` claim.")
    max_keys_per_user: int = Field(100, ge=1, description="Most active API keys per user.")
    access_token_minutes: int = Field(15, ge=1, description="Access-token lifetime.")
    api_key_cache_seconds: float = Field(
        5.0,
        ge=0,
        le=60,
        description="Seconds a verified API key is trusted without a database read (per "
        "process; 0 = read on every request). Revocation, deactivation and tier changes apply "
        "at once on the process that made them, within this many seconds on the others.",
    )
    api_key_outage_grace_seconds: float = Field(
        300.0,
        ge=0,
        le=86_400,
        description="While the database cannot be reached, API keys verified less than this "
        "many seconds ago keep working (per process; 0 = every request gets 503 during an "
        "outage). Revocations apply as soon as the database is back.",
    )
    refresh_token_days: int = Field(14, ge=1, description="Refresh-token lifetime.")
    cors_origins: list[str] = Field(default_factory=list, description="Allowed CORS origins.")
    cors_allow_credentials: bool = Field(False, description="Allow credentials in CORS.")
    # NoDecode: the env value is a comma-separated list (as uvicorn's FORWARDED_ALLOW_IPS), easy
    # to write in a Procfile or a start command; a JSON list is accepted too.
    trusted_proxies: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="CIDRs whose X-Forwarded-For is believed, comma-separated "
        "(docs/deployment.md lists each platform's).",
    )
    metrics_public: bool = Field(
        False, description="Serve /metrics without credentials (else an admin credential)."
    )
    web_ui: bool = Field(
        True, description="Serve the web playground and dashboards at / (static, public page)."
    )
    metrics_token: SecretStr | None = Field(
        None,
        description="Bearer token that may read /metrics (for Prometheus) when it is not public; "
        "production refuses example and guessable values, as for the JWT secret.",
    )
    otel_telemetry: bool = Field(
        False,
        description="FastAPI's native OpenTelemetry spans and metrics, for deployments that "
        "configure an OpenTelemetry SDK (off: FastAPI would look up the global providers on "
        "every request; /metrics serves Prometheus either way). With llm-api's own tracing on "
        "(OTEL_*, docs/tracing.md), FastAPI's HTTP span goes to the same exporter, around it.",
    )

    # --- lifecycle --------------------------------------------------------------------------
    drain_timeout: float = Field(
        30.0,
        gt=0,
        description="On SIGTERM, seconds in-flight requests may run before they are cut off.",
    )

    # --- rate limits (services/rate_limit) -----------------------------------------------------
    rate_limit_enabled: bool = Field(
        True, description="Enforce rate limits and token quotas per user, API key and client IP."
    )
    rate_limit_tiers: dict[str, TierLimits] = Field(
        default_factory=lambda: dict(DEFAULT_TIERS),
        description='Limits per tier as JSON, e.g. {"free": {"requests_per_minute": 30}}; '
        "fields given replace the built-in ones (free, paid, anonymous, ip), null = unlimited.",
    )
    rate_limit_overrides_file: Path | None = Field(
        None, description="YAML file with per-user and per-key limits (users: {id: {...}})."
    )
    rate_limit_login_free_attempts: int = Field(
        5,
        ge=1,
        le=100,
        description="Login attempts per (account, client) before each further one waits a "
        "doubling delay (1 s, 2 s, 4 s, ...); a success resets it. Never a lock-out.",
    )
    rate_limit_login_max_delay_seconds: int = Field(
        900, ge=1, le=86_400, description="The longest delay between two such login attempts."
    )
    rate_limit_login_per_client: str = Field(
        "60/minute",
        description="Login attempts from one client over all accounts (against credential "
        "stuffing; skipped for accounts that logged in from that client recently).",
    )
    rate_limit_key_creation: str = Field(
        "20/hour", description="API keys created per account, and per client IP."
    )
    rate_limit_failure_mode: Literal["local", "open", "closed"] = Field(
        "local",
        description="When Redis fails: local = each process enforces its share in memory; "
        "open = no limits; closed = 503 with Retry-After.",
    )
    rate_limit_replicas: int = Field(
        1,
        ge=1,
        description="Replicas sharing Redis; the local fallback enforces limit ÷ "
        "(replicas × workers) per process.",
    )
    rate_limit_redis_timeout_ms: int = Field(
        100,
        ge=5,
        le=1000,
        description="Timeout of each limiter call to Redis; a slower call counts toward marking "
        "Redis down, unless the event loop itself was lagging (CPU-bound work, a starved "
        "process), which extends the call instead.",
    )
    rate_limit_lease_seconds: int = Field(
        60, ge=3, description="Concurrency slots of a crashed worker free themselves after this."
    )
    rate_limit_key_prefix: str = Field(
        "llm-api:rl", min_length=1, description="Prefix of the limiter's Redis keys."
    )
    rate_limit_memory_max_keys: int = Field(
        100_000,
        ge=100,
        description="Most limit keys the in-memory store (no Redis, or the fallback while Redis "
        "is down) holds; expired ones are swept, live ones never dropped: beyond it a new client "
        "gets 503 until keys expire.",
    )

    # --- stored responses (/v1/responses store) -----------------------------------------------
    responses_retention_days: int = Field(
        30,
        ge=1,
        description="Stored /v1/responses answers (store=true, the default) older than this are "
        "deleted (checked hourly).",
    )

    # --- money: prices, budgets, spend alerts -------------------------------------------------
    budget_webhook_url: str | None = Field(
        None,
        description="Where soft-limit alerts are POSTed (JSON, HMAC-SHA256 signed with "
        "LLM_API_BUDGET_WEBHOOK_SECRET; docs/usage.md). Unset: no webhooks, the response "
        "header still warns.",
    )
    budget_webhook_secret: SecretStr | None = Field(
        None, description="Key of the webhooks' `x-llm-api-signature` (HMAC-SHA256)."
    )
    budget_webhook_max_attempts: int = Field(
        10, ge=1, le=100, description="Tries per alert, with exponential backoff, then given up."
    )
    budget_webhook_backoff_seconds: float = Field(
        1.0, gt=0, le=3600, description="Wait before the first retry; doubles each try."
    )
    budget_refresh_seconds: float = Field(
        5.0,
        gt=0,
        le=3600,
        description="How often each process reloads the budgets from the database (a change "
        "through the API applies at once on the process that made it).",
    )

    @model_validator(mode="after")
    def _signed_webhooks(self) -> Settings:
        # Unsigned alerts could be forged by anyone who can reach the receiver.
        if self.budget_webhook_url and not self.budget_webhook_secret:
            raise ValueError("LLM_API_BUDGET_WEBHOOK_URL needs LLM_API_BUDGET_WEBHOOK_SECRET")
        if self.budget_webhook_url and not self.budget_webhook_url.startswith(
            ("http://", "https://")
        ):
            raise ValueError("LLM_API_BUDGET_WEBHOOK_URL must be an http(s) URL")
        return self

    # --- fair queuing and priorities (services/llm/admission.py) ------------------------------
    fair_queuing: bool = Field(
        True,
        description="Order each model's queue by priority class, then weighted fair queuing "
        "across tenants (docs/fair-sharing.md); false: first come, first served.",
    )
    fair_weights: dict[str, Annotated[float, Field(gt=0)]] = Field(
        default_factory=lambda: {"free": 1.0, "paid": 3.0},
        description='Share of a queue per tier, as JSON, e.g. {"free": 1, "paid": 3}; a tier '
        "not listed weighs 1.",
    )
    fair_expected_output_tokens: int = Field(
        256,
        ge=1,
        description="Output tokens a request without max_tokens is charged when admitted; "
        "corrected to the real count when it ends.",
    )
    fair_reserved_slots: int = Field(
        1,
        ge=0,
        le=8,
        description="Sequences each local batched engine keeps on top of its `slots` for "
        "tenants below their fair share, so a newcomer need not wait for a busy tenant's "
        "generation to end (docs/fair-sharing.md). Extra KV memory: this many × context_length "
        "tokens. Upstream deployments keep none: their concurrency cap is theirs.",
    )
    fair_aging_seconds: float = Field(
        10.0,
        gt=0,
        description="A lowered or Batch API request waiting this long is served as interactive.",
    )

    # --- tracing (OpenTelemetry) -------------------------------------------------------------
    # Turned on and configured by the standard OTEL_* variables (docs/tracing.md), not here.
    tracing_capture_content: bool = Field(
        False,
        description="Record prompt and completion text in traces (gen_ai.input.messages, "
        "gen_ai.output.messages). Off: spans carry sizes, models and timings, never text.",
    )

    # --- audit log ----------------------------------------------------------------------------
    audit_retention_days: int = Field(
        365,
        ge=0,
        description="Audit events older than this are deleted (hourly; the chain stays "
        "verifiable from the last deleted row's hash). 0 keeps them forever.",
    )
    audit_login_failures_per_minute: int = Field(
        60,
        ge=1,
        le=100_000,
        description="Most refused-login audit rows one process writes per minute; beyond it "
        "refusals are counted into the next row written (bounds the table under attack).",
    )

    # --- single sign-on (OpenID Connect) ------------------------------------------------------
    oidc_issuer_url: str | None = Field(
        None,
        description="OpenID Connect issuer (its /.well-known/openid-configuration is read). "
        "Unset: no single sign-on.",
    )
    oidc_client_id: str | None = Field(None, description="Client id registered at the provider.")
    oidc_client_secret: SecretStr | None = Field(
        None, description="Client secret (confidential client); unset for a public client."
    )
    oidc_redirect_uri: str | None = Field(
        None,
        description="This server's callback, exactly as registered at the provider: "
        "https://HOST/v1/auth/oidc/callback (required with an issuer; never taken from requests).",
    )
    oidc_scopes: str = Field("openid email profile", description="Scopes asked for.")
    oidc_allowed_email_domains: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Email domains whose users may sign in (comma-separated); accounts are "
        "created at first sign-in. Empty: nobody may.",
    )
    oidc_tier_claim: str | None = Field(
        None, description="ID-token/userinfo claim whose values map to a tier (e.g. groups)."
    )
    oidc_tier_map: dict[str, Literal["free", "paid"]] = Field(
        default_factory=dict,
        description='Claim value -> tier as JSON, e.g. {"llm-paid": "paid"}; paid wins; no '
        "match: free. Applied at every sign-in.",
    )
    oidc_teams_claim: str | None = Field(
        None,
        description="Claim listing team names: the user joins each existing team named there "
        "as a member at sign-in (teams are not created, memberships not removed).",
    )
    oidc_button_label: str = Field(
        "Sign in with SSO", max_length=64, description="The sign-in page's SSO button text."
    )
    password_login_enabled: bool = Field(
        True,
        description="Allow POST /v1/auth/token (password sign-in); false leaves SSO and API keys.",
    )

    # --- fine-tuning jobs ---------------------------------------------------------------------
    finetune_max_active_per_user: int = Field(
        1, ge=1, description="Fine-tuning jobs of one user not yet finished (queued or running)."
    )
    finetune_max_examples: int = Field(
        10_000, ge=1, description="Most examples in one fine-tuning training file."
    )
    finetune_threads: int | None = Field(
        None,
        ge=1,
        description="CPU threads for training (default: the CPUs this process may use). On a "
        "machine shared with other busy processes fewer can be as fast (bench finetune).",
    )
    finetune_checkpoint_every: int = Field(
        10, ge=1, description="Training steps between checkpoints (what a resumed job keeps)."
    )
    finetune_max_seq_tokens: int = Field(
        1024, ge=16, description="Longest training example (prompt and answer), in tokens."
    )
    finetune_max_loaded_models: int = Field(
        4, ge=1, description="Fine-tuned models kept loaded for serving (least recently used go)."
    )
    finetune_serving_slots: int = Field(
        4, ge=1, le=64, description="Sequences one fine-tuned model decodes together."
    )

    @field_validator("oidc_allowed_email_domains", mode="before")
    @classmethod
    def _split_domains(cls, v: object) -> object:
        if isinstance(v, str):
            text = v.strip()
            if text.startswith("["):
                return json.loads(text)
            return [part.strip().lower().lstrip("@") for part in text.split(",") if part.strip()]
        return v

    @field_validator("trusted_proxies", mode="before")
    @classmethod
    def _split_cidrs(cls, v: object) -> object:
        if isinstance(v, str):
            text = v.strip()
            if text.startswith("["):
                return json.loads(text)
            return [part.strip() for part in text.split(",") if part.strip()]
        return v

    @field_validator("trusted_proxies")
    @classmethod
    def _valid_cidrs(cls, v: list[str]) -> list[str]:
        for i, cidr in enumerate(v):
            try:
                ipaddress.ip_network(cidr, strict=False)
            except ValueError:
                raise ValueError(f"entry {i} is not an IP network (CIDR)") from None
        return v

    @field_validator("rate_limit_tiers")
    @classmethod
    def _merge_tiers(cls, v: dict[str, TierLimits]) -> dict[str, TierLimits]:
        return merge_tiers(v)

    @field_validator("rate_limit_overrides_file", mode="before")
    @classmethod
    def _empty_is_none(cls, v: object) -> object:
        return None if v == "" else v

    @field_validator("rate_limit_login_per_client", "rate_limit_key_creation")
    @classmethod
    def _valid_rate(cls, v: str) -> str:
        from limits import parse

        try:
            parse(v)  # "10/minute", "20/hour"
        except ValueError:
            raise ValueError("not a rate such as 10/minute") from None
        return v

    @model_validator(mode="after")
    def _refuse_unsafe(self) -> Settings:
        if self.environment == "production":
            self._refuse_weak_secrets()
        elif self.environment != "development" and (
            self.jwt_secret == DEFAULT_JWT_SECRET or len(self.jwt_secret) < 32
        ):
            raise ValueError(
                "LLM_API_JWT_SECRET must be set to a random value of >= 32 characters "
                "outside development"
            )
        # Anyone who can reach the server can read the default secret in this repository and
        # sign their own tokens with it; development keeps it only while serving this machine.
        self.refuse_public_bind(self.host)
        if not self.auth_enabled and not is_loopback_host(self.host):
            raise ValueError(
                "LLM_API_AUTH_ENABLED=false is only allowed while binding to a loopback address"
            )
        if "*" in self.cors_origins and self.cors_allow_credentials:
            raise ValueError("CORS: '*' origins cannot be combined with credentials")
        if self.oidc_issuer_url and not (self.oidc_client_id and self.oidc_redirect_uri):
            raise ValueError(
                "LLM_API_OIDC_ISSUER_URL needs LLM_API_OIDC_CLIENT_ID and LLM_API_OIDC_REDIRECT_URI"
            )
        for name, url in (
            ("ISSUER_URL", self.oidc_issuer_url),
            ("REDIRECT_URI", self.oidc_redirect_uri),
        ):
            if url and not _https_or_loopback(url):
                raise ValueError(f"LLM_API_OIDC_{name} must be https (or http on loopback)")
        return self

    def _refuse_weak_secrets(self) -> None:
        """Production takes only generated secrets: no example value, nothing guessable
        (core/secret_strength.py). Messages name the setting and the reason, never the value."""
        secrets = {"LLM_API_JWT_SECRET": self.jwt_secret}
        if self.metrics_token is not None:
            secrets["LLM_API_METRICS_TOKEN"] = self.metrics_token.get_secret_value()
        for name, value in secrets.items():
            reason = weakness(value)
            if reason:
                raise ValueError(
                    f"{name} is not fit for production: {reason}. Generate one, e.g. "
                    "`openssl rand -hex 32`, or let the platform generate it."
                )
        # Passwords inside connection URLs are the platform's or the operator's choice; refuse
        # only the placeholders shipped in this repository's examples.
        for name, url in (
            ("LLM_API_DATABASE_URL", self.database_url),
            ("LLM_API_REDIS_URL", self.redis_url),
        ):
            password = _url_password(url)
            if password and weakness(password, min_chars=0, min_bits=0):
                raise ValueError(
                    f"{name} holds an example or placeholder password; set the real one"
                )

    def refuse_public_bind(self, host: str) -> None:
        """Refuse to serve anything but this machine with the published development secret
        (checked for LLM_API_HOST here, for `llm-api serve --host` and for gunicorn's bind)."""
        if self.jwt_secret == DEFAULT_JWT_SECRET and not is_loopback_host(host):
            raise ValueError(
                "LLM_API_JWT_SECRET is the published development default; it may only be used "
                "while binding to a loopback address. Set a random secret "
                "(`openssl rand -hex 32`) to listen on other addresses."
            )

    @cached_property
    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite+aiosqlite:///{(self.data_dir / 'llm-api.db').resolve()}"

    @property
    def json_logs(self) -> bool:
        return self.log_json if self.log_json is not None else self.environment == "production"


def _https_or_loopback(url: str) -> bool:
    try:
        parts = urlsplit(url)
    except ValueError:
        return False
    if parts.scheme == "https" and parts.hostname:
        return True
    return parts.scheme == "http" and is_loopback_host(parts.hostname or "")


def _url_password(url: str | None) -> str | None:
    if not url:
        return None
    try:
        return urlsplit(url).password
    except ValueError:  # a malformed URL fails later, where it is used
        return None
