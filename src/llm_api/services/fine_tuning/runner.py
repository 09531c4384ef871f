"""Runs one fine-tuning job: the body of the Celery task and of the embedded dispatcher.

The same lease as batches (services/leases.py; services/batches/runner.py explains it): one
worker holds a job at a time and renews its lease while it lives; a SIGKILLed worker's lease
lapses within seconds and another worker resumes the job from its last checkpoint (training
state saved every `finetune_checkpoint_every` steps; the steps since are trained again, with
the same batches).
Training runs in a thread; between steps it stops when the job is cancelled (seen within a
second) or the lease is lost. The tokens trained go to the usage ledger as one row per job.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import structlog
from sqlalchemy import ColumnElement, select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from llm_api.db.tables import (
    FineTuningCheckpoint,
    FineTuningJob,
    UsageRecord,
    User,
)
from llm_api.services.batches.storage import FileStore
from llm_api.services.fine_tuning.dataset import parse_examples, tokenize_examples, tokenizer_for
from llm_api.services.fine_tuning.ids import job_dir, model_name, new_checkpoint_id
from llm_api.services.fine_tuning.service import ACTIVE, event_row
from llm_api.services.leases import Lease, RowLease, worker_id
from llm_api.services.money.prices import FREE, Pricing

log = structlog.get_logger(__name__)


def _now() -> datetime:
    return datetime.now(UTC)


@dataclass(slots=True)
class FineTuneConfig:
    data_dir: Path
    cache_dir: Path
    base_models: dict[str, tuple[Path, int]]  # model id → (GGUF, context length)
    lease_seconds: float = 6.0
    threads: int = 1
    checkpoint_every: int = 10
    max_seq_tokens: int = 1024
    max_examples: int = 10_000
    # Each base model's price per trained token (its registry `pricing.training`); absent: free.
    prices: dict[str, Pricing] = field(default_factory=dict)


class FineTuneRunner:
    def __init__(
        self, sessions: async_sessionmaker[AsyncSession], files: FileStore, config: FineTuneConfig
    ) -> None:
        self.sessions = sessions
        self.files = files
        self.config = config
        self.owner = worker_id()
        self.leases = RowLease(
            FineTuningJob,
            ACTIVE,
            self.owner,
            sessions,
            renew_failed_event="fine_tune_lease_renew_failed",
            id_key="job_id",
        )

    # --- running --------------------------------------------------------------------------------

    async def run(self, job_id: str) -> str | None:
        """Run or resume a job. Returns its final status, or None when another worker holds it
        or it has finished."""
        lease = Lease(self.config.lease_seconds)
        if not await self.leases.acquire(job_id, lease):
            return None
        async with self.leases.renewing(job_id, lease):
            return await self._run(job_id, lease)

    async def _event(self, job_id: str, message: str, **kw: object) -> None:
        async with self.sessions.begin() as s:
            s.add(event_row(job_id, message, **kw))  # type: ignore[arg-type]

    async def _run(self, job_id: str, lease: Lease) -> str:
        async with self.sessions.begin() as s:
            job = await s.get(FineTuningJob, job_id)
            assert job is not None
            owner = await s.get(User, job.user_id)
            if owner is None or not owner.is_active:
                job.status, job.finished_at = "cancelled", _now()
                s.add(event_row(job_id, "Fine-tuning job cancelled: its owner is deactivated"))
                return job.status
            checkpoint = await s.scalar(
                select(FineTuningCheckpoint)
                .where(FineTuningCheckpoint.job_id == job_id)
                .order_by(FineTuningCheckpoint.step.desc())
                .limit(1)
            )
            resumed_step = checkpoint.step if checkpoint is not None else 0
            first_start = job.started_at is None
            job.status, job.started_at = "running", job.started_at or _now()
            snapshot = (job.model, job.training_file, job.seed, dict(job.hyperparameters))
            suffix, owner_name = job.suffix, job.team_id or job.user_id
            user_id, team_id = job.user_id, job.team_id
            if first_start:
                s.add(event_row(job_id, "Fine-tuning job started"))
            elif checkpoint is not None:
                # The steps after the checkpoint are trained again: count from its totals.
                job.step = checkpoint.step
                job.trained_tokens = int(checkpoint.metrics.get("trained_tokens", 0))
                s.add(
                    event_row(
                        job_id,
                        f"Resumed from the checkpoint at step {resumed_step}",
                        data={"step": resumed_step},
                    )
                )
            else:
                job.step, job.trained_tokens = 0, 0
                s.add(event_row(job_id, "Restarted from the beginning (no checkpoint yet)"))
        base, training_file, seed, hp = snapshot
        try:
            status = await self._train(
                job_id,
                lease,
                base,
                training_file,
                seed,
                hp,
                resume_step=resumed_step if checkpoint is not None else None,
            )
        except Exception as exc:
            log.warning("fine_tune_failed", job_id=job_id, exc_info=True)
            if not lease.held():
                return "running"
            async with self.sessions.begin() as s:
                job = await s.get(FineTuningJob, job_id)
                assert job is not None
                if job.status == "running":
                    job.status, job.finished_at = "failed", _now()
                    job.error_json = {
                        "code": "training_failed",
                        "message": f"Training failed: {type(exc).__name__}: {str(exc)[:300]}",
                        "param": None,
                    }
                    s.add(event_row(job_id, "Fine-tuning job failed", level="error"))
                return job.status
        if status != "succeeded":
            return status
        async with self.sessions.begin() as s:
            job = await s.get(FineTuningJob, job_id)
            assert job is not None
            if job.status != "running":  # cancelled at the very end: keep the cancel
                return job.status
            job.status, job.finished_at = "succeeded", _now()
            job.fine_tuned_model = model_name(base, owner_name, suffix, job_id)
            s.add(event_row(job_id, f"New fine-tuned model created: {job.fine_tuned_model}"))
            s.add(event_row(job_id, "The job has successfully completed"))
            # The usage ledger: one row per job, the tokens trained as its prompt tokens.
            request_id = f"{job_id}-training"
            if await s.get(UsageRecord, request_id) is None:
                started = job.started_at or job.finished_at
                started = started if started.tzinfo else started.replace(tzinfo=UTC)
                s.add(
                    UsageRecord(
                        request_id=request_id,
                        created_at=job.finished_at,
                        day=job.finished_at.date(),
                        user_id=user_id,
                        model=base,
                        endpoint="fine_tuning",
                        team_id=team_id,
                        cost_nanos=self.config.prices.get(base, FREE).training_cost(
                            job.trained_tokens
                        ),
                        prompt_tokens=job.trained_tokens,
                        completion_tokens=0,
                        status=200,
                        latency_ms=(job.finished_at - started).total_seconds() * 1000,
                    )
                )
            return job.status

    async def _train(
        self,
        job_id: str,
        lease: Lease,
        base: str,
        training_file: str,
        seed: int,
        hp: dict[str, object],
        resume_step: int | None,
    ) -> str:
        from llm_api.services.fine_tuning.trainer import (
            StepReport,
            TrainSpec,
            checkpoint_path,
            train,
        )

        cfg = self.config
        gguf, context = cfg.base_models[base]
        workdir = job_dir(cfg.data_dir, job_id, create=True)
        data = await asyncio.to_thread(self.files.read, training_file)

        def prepare() -> list:  # type: ignore[type-arg]
            examples = parse_examples(data, max_examples=cfg.max_examples)
            return tokenize_examples(
                examples,
                tokenizer_for(gguf),
                max_tokens=min(cfg.max_seq_tokens, context),
                param="training_file",
            )

        examples = await asyncio.to_thread(prepare)
        spec = TrainSpec(
            gguf=gguf,
            cache_dir=cfg.cache_dir,
            workdir=workdir,
            examples=examples,
            n_epochs=int(hp["n_epochs"]),  # type: ignore[call-overload]
            batch_size=int(hp["batch_size"]),  # type: ignore[call-overload]
            learning_rate_multiplier=float(hp["learning_rate_multiplier"]),  # type: ignore[arg-type]
            seed=seed,
            threads=cfg.threads,
            checkpoint_every=cfg.checkpoint_every,
        )
        loop = asyncio.get_running_loop()
        stop = threading.Event()

        def call(coro: object) -> None:  # from the training thread, onto the event loop
            asyncio.run_coroutine_threadsafe(coro, loop).result(timeout=60)  # type: ignore[arg-type]

        def on_step(r: StepReport) -> None:
            if lease.held():
                call(self._record_step(job_id, r))

        def on_checkpoint(step: int, path: Path, metrics: dict[str, float]) -> None:
            if lease.held():
                call(self._record_checkpoint(job_id, step, metrics))

        async def watch() -> None:
            """Cancel (or losing the lease) stops training after the current step."""
            while not stop.is_set():
                await asyncio.sleep(0.5)
                status = None
                with contextlib.suppress(Exception):
                    async with self.sessions() as s:
                        status = await s.scalar(
                            select(FineTuningJob.status).where(FineTuningJob.id == job_id)
                        )
                if status in ("cancelled", "failed") or not lease.held():
                    stop.set()

        resume = checkpoint_path(workdir, resume_step) if resume_step else None
        if resume is not None and not resume.exists():
            resume = None  # the checkpoint's file is gone (another disk): start over
        watcher = asyncio.create_task(watch())
        try:
            result = await asyncio.to_thread(
                train,
                spec,
                resume_from=resume,
                on_step=on_step,
                on_checkpoint=on_checkpoint,
                should_stop=stop.is_set,
            )
        finally:
            stop.set()
            watcher.cancel()
            await asyncio.gather(watcher, return_exceptions=True)
        if result.adapter is None:
            async with self.sessions() as s:
                status = await s.scalar(
                    select(FineTuningJob.status).where(FineTuningJob.id == job_id)
                )
            return str(status) if lease.held() else "running"
        return "succeeded" if lease.held() else "running"

    async def _record_step(self, job_id: str, r: object) -> None:
        from llm_api.services.fine_tuning.trainer import StepReport

        assert isinstance(r, StepReport)
        async with self.sessions.begin() as s:
            await s.execute(
                update(FineTuningJob)
                .where(FineTuningJob.id == job_id, FineTuningJob.lease_owner == self.owner)
                .values(
                    step=r.step,
                    total_steps=r.total_steps,
                    trained_tokens=FineTuningJob.trained_tokens + r.tokens,
                )
            )
            s.add(
                event_row(
                    job_id,
                    f"Step {r.step}/{r.total_steps}: training loss={r.loss:.4f}",
                    type="metrics",
                    data={"step": r.step, "total_steps": r.total_steps, "train_loss": r.loss},
                )
            )

    async def _record_checkpoint(self, job_id: str, step: int, metrics: dict[str, float]) -> None:
        async with self.sessions.begin() as s:
            s.add(
                FineTuningCheckpoint(
                    id=new_checkpoint_id(), job_id=job_id, step=step, metrics=metrics
                )
            )
            s.add(event_row(job_id, f"Checkpoint saved at step {step}", data={"step": step}))


async def runnable_jobs(
    sessions: async_sessionmaker[AsyncSession], *, stranded_only: bool = False, limit: int = 8
) -> list[str]:
    """Active jobs no worker holds (as `runnable_batches`)."""
    now = _now()
    unleased: ColumnElement[bool] = FineTuningJob.lease_until.is_(None)
    if stranded_only:
        unleased = unleased & (FineTuningJob.created_at < now - timedelta(minutes=5))
    async with sessions() as s:
        rows = await s.scalars(
            select(FineTuningJob.id)
            .where(
                FineTuningJob.status.in_(ACTIVE),
                unleased | (FineTuningJob.lease_until < now),
            )
            .order_by(FineTuningJob.created_at)
            .limit(limit)
        )
        return list(rows)
