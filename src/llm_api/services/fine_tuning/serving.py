"""Serving fine-tuned models: `ft:...` ids visible to their owner (and the owner's team),
each served by its own batched llama.cpp engine on the base GGUF with the job's LoRA adapter
applied (llama.cpp's adapter support), loaded on first use, at most `finetune_max_loaded_models`
at once (the least recently used idle one is unloaded).

Why an engine per model, not per-request adapters in the shared engine: llama.cpp sets adapters
per context, and the shared engine decodes many requests' tokens in one call; switching
adapters per request would split every step. A separate small engine (a few slots, its own KV
cache) keeps the base model's engine untouched, and the weights file is mmapped once by the OS.

Access is checked against the database (owner, team membership, deleted or not) and remembered
for a few seconds per caller, so a deletion takes effect within that on every process.
"""

from __future__ import annotations

import asyncio
import ctypes
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import llama_cpp
import structlog
from sqlalchemy import select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from llm_api.core.config import Settings
from llm_api.core.exceptions import ModelNotFoundError
from llm_api.db.tables import ApiKey, FineTuningJob, TeamMember
from llm_api.services.fine_tuning.ids import job_dir
from llm_api.services.llm.admission import AdmissionGate
from llm_api.services.llm.backends.llama_batched import LlamaBatchedBackend
from llm_api.services.llm.fingerprint import model_fingerprint
from llm_api.services.llm.priority import fair_policy, reserved_slots
from llm_api.services.llm.registry import ModelConfig
from llm_api.services.llm.service import LLMService
from llm_api.services.llm.types import RequestContext

log = structlog.get_logger(__name__)

ACCESS_SECONDS = 5.0


class LoraBatchedBackend(LlamaBatchedBackend):
    """The batched engine on the base GGUF with one LoRA adapter set on its context."""

    def __init__(
        self, config: ModelConfig, adapter: Path, *, threads: int | None = None, reserved: int = 0
    ) -> None:
        super().__init__(config, threads=threads, reserved=reserved)
        self.adapter = adapter

    def _configure_context(self) -> None:
        adapter = llama_cpp.llama_adapter_lora_init(self._model.model, str(self.adapter).encode())
        if not adapter:
            raise RuntimeError(f"llama.cpp could not load the LoRA adapter {self.adapter.name}")
        adapters = (llama_cpp.llama_adapter_lora_p_ctypes * 1)(adapter)
        scales = (ctypes.c_float * 1)(1.0)
        if llama_cpp.llama_set_adapters_lora(self._ctx.ctx, adapters, 1, scales):
            raise RuntimeError("llama.cpp could not set the LoRA adapter")
        # Freed with the model (llama.cpp frees a model's adapters when it frees the model).


@dataclass(slots=True)
class _Visible:
    config: ModelConfig
    job_id: str
    created: int
    owner: str
    checked: float


class FineTunedModels:
    def __init__(
        self,
        llm: LLMService,
        sessions: async_sessionmaker[AsyncSession],
        settings: Settings,
    ) -> None:
        self.llm = llm
        self.sessions = sessions
        self.settings = settings
        self._access: dict[tuple[str, str | None, str | None], _Visible] = {}
        self._loaded: OrderedDict[str, LlamaBatchedBackend] = OrderedDict()
        self._lock = asyncio.Lock()

    # --- who may see what -----------------------------------------------------------------------

    async def _teams(self, s: AsyncSession, ctx: RequestContext) -> set[str]:
        if ctx.user_id is None:
            return set()
        teams = set(
            await s.scalars(select(TeamMember.team_id).where(TeamMember.user_id == ctx.user_id))
        )
        if ctx.key_id is not None:
            key_team = await s.scalar(select(ApiKey.team_id).where(ApiKey.id == ctx.key_id))
            if key_team is not None:
                teams.add(key_team)
        return teams

    async def visible_jobs(self, ctx: RequestContext) -> list[FineTuningJob]:
        """The caller's succeeded, undeleted jobs, and those of their teams."""
        if ctx.user_id is None:
            return []
        async with self.sessions() as s:
            teams = await self._teams(s, ctx)
            mine = FineTuningJob.user_id == ctx.user_id
            where = mine | FineTuningJob.team_id.in_(teams) if teams else mine
            return list(
                await s.scalars(
                    select(FineTuningJob)
                    .where(
                        where,
                        FineTuningJob.status == "succeeded",
                        FineTuningJob.fine_tuned_model.is_not(None),
                        FineTuningJob.model_deleted_at.is_(None),
                    )
                    .order_by(FineTuningJob.created_at)
                )
            )

    def _config(self, job: FineTuningJob) -> ModelConfig:
        base = self.llm.get_model(job.model)
        assert job.fine_tuned_model is not None
        return base.model_copy(
            update={
                "id": job.fine_tuned_model,
                "aliases": [],
                "fallbacks": [],
                "slots": min(base.slots, self.settings.finetune_serving_slots),
                "concurrency": min(base.slots, self.settings.finetune_serving_slots),
                "owned_by": job.team_id or job.user_id,
            }
        )

    async def cards(self, ctx: RequestContext) -> list[tuple[ModelConfig, int]]:
        """The caller's fine-tuned models for /v1/models. While the database is unreachable
        the list goes on without them (the served models do not depend on it)."""
        try:
            jobs = await self.visible_jobs(ctx)
        except (SQLAlchemyError, OSError) as exc:
            log.warning("fine_tuned_models_unlisted", error=type(exc).__name__)
            return []
        out = []
        for job in jobs:
            try:
                created = int((job.finished_at or job.created_at).timestamp())
                out.append((self._config(job), created))
            except ModelNotFoundError:  # its base model left the registry
                continue
        return out

    async def lookup(self, model_id: str, ctx: RequestContext) -> _Visible:
        key = (model_id, ctx.user_id, ctx.key_id)
        seen = self._access.get(key)
        if seen is not None and time.monotonic() - seen.checked < ACCESS_SECONDS:
            return seen
        self._access.pop(key, None)
        job = next(
            (j for j in await self.visible_jobs(ctx) if j.fine_tuned_model == model_id), None
        )
        if job is None:
            raise ModelNotFoundError(model_id)
        created = int((job.finished_at or job.created_at).timestamp())
        seen = _Visible(
            self._config(job), job.id, created, job.team_id or job.user_id, time.monotonic()
        )
        if len(self._access) > 10_000:
            self._access.clear()
        self._access[key] = seen
        return seen

    def visible_config(self, model_id: str, ctx: RequestContext) -> ModelConfig | None:
        """Synchronous: the config if `ensure` let this caller see it a moment ago."""
        seen = self._access.get((model_id, ctx.user_id, ctx.key_id))
        if seen is None or time.monotonic() - seen.checked >= ACCESS_SECONDS + 60:
            return None
        return seen.config

    # --- loading --------------------------------------------------------------------------------

    async def ensure(self, model_id: str, ctx: RequestContext) -> None:
        """Check access, then load the model's engine if it is not loaded yet."""
        seen = await self.lookup(model_id, ctx)
        async with self._lock:
            if model_id in self._loaded:
                self._loaded.move_to_end(model_id)
                return
            await self._evict()
            adapter = job_dir(self.settings.data_dir, seen.job_id) / "adapter.gguf"
            if not adapter.exists():
                raise ModelNotFoundError(model_id)
            reserved = reserved_slots(self.settings, seen.config)
            backend = LoraBatchedBackend(
                seen.config, adapter, threads=self.settings.llama_threads, reserved=reserved
            )
            await backend.start(warmup=False)
            self.llm.backends[model_id] = backend
            self.llm.gates[model_id] = AdmissionGate(
                model_id,
                seen.config.concurrency,
                seen.config.max_queue,
                fair_policy(self.settings),
                reserved=reserved,
            )
            self.llm.fingerprints[model_id] = _fingerprint(seen.config, adapter)
            self._loaded[model_id] = backend
            log.info("fine_tuned_model_loaded", model=model_id)

    async def _evict(self) -> None:
        limit = self.settings.finetune_max_loaded_models
        for model_id in list(self._loaded):
            if len(self._loaded) < limit:
                return
            gate = self.llm.gates.get(model_id)
            if gate is not None and (gate.running or gate.waiting):
                continue  # in use: over the bound for a while rather than cut a request
            await self.unload(model_id)

    async def unload(self, model_id: str) -> None:
        backend = self._loaded.pop(model_id, None)
        self._access = {k: v for k, v in self._access.items() if k[0] != model_id}
        if backend is None:
            return
        self.llm.backends.pop(model_id, None)
        self.llm.gates.pop(model_id, None)
        self.llm.fingerprints.pop(model_id, None)
        await backend.aclose()
        log.info("fine_tuned_model_unloaded", model=model_id)

    async def aclose(self) -> None:
        for model_id in list(self._loaded):
            await self.unload(model_id)


def _fingerprint(config: ModelConfig, adapter: Path) -> str:
    import hashlib

    h = hashlib.sha256(model_fingerprint(config).encode())
    h.update(adapter.read_bytes()[: 1 << 20])
    return "fp_" + h.hexdigest()[:10]
