"""Fine-tuning jobs as the API sees them: validation before a job starts, ownership, quotas,
cancel, events, checkpoints, and deleting the resulting model.

Every lookup is scoped to the owner: another user's job is "not found" (404). The session is
the request's; this service never commits (the DbSession dependency does). Parsing and
tokenizing a training file is CPU work, done in a thread.
"""

from __future__ import annotations

import asyncio
import math
import secrets
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import func, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from llm_api.core.exceptions import InvalidRequestError, ModelNotFoundError, NotFoundError
from llm_api.db.tables import FineTuningCheckpoint, FineTuningEvent, FineTuningJob, StoredFile
from llm_api.schemas.fine_tuning import (
    CheckpointMetrics,
    CreateFineTuningJobRequest,
    Hyperparameters,
    JobError,
    ResolvedHyperparameters,
    ResolvedMethod,
)
from llm_api.schemas.fine_tuning import FineTuningCheckpoint as CheckpointObject
from llm_api.schemas.fine_tuning import FineTuningEvent as EventObject
from llm_api.schemas.fine_tuning import FineTuningJob as JobObject
from llm_api.services.batches.service import ts
from llm_api.services.batches.storage import FileStore
from llm_api.services.fine_tuning import extra
from llm_api.services.fine_tuning.dataset import parse_examples, tokenize_examples, tokenizer_for
from llm_api.services.fine_tuning.ids import new_event_id, new_job_id
from llm_api.services.paging import newest_first

TERMINAL = ("succeeded", "failed", "cancelled")
ACTIVE = ("validating_files", "queued", "running")
PURPOSE = "fine-tune"


def event_row(
    job_id: str,
    message: str,
    *,
    level: str = "info",
    type: str = "message",
    data: dict[str, object] | None = None,
) -> FineTuningEvent:
    return FineTuningEvent(
        id=new_event_id(),
        job_id=job_id,
        seq=time.time_ns() // 1000,
        created_at=datetime.now(UTC),
        level=level,
        type=type,
        message=message[:512],
        data=data,
    )


def resolve_hyperparameters(hp: Hyperparameters, n_examples: int) -> ResolvedHyperparameters:
    """OpenAI's "auto": epochs so a small file is seen enough (at least ~24 steps' worth of
    examples, 1 to 10 epochs), batches of up to 8, learning-rate multiplier 1."""
    batch = hp.batch_size if hp.batch_size != "auto" else max(1, min(8, n_examples // 4 or 1))
    epochs = (
        hp.n_epochs
        if hp.n_epochs != "auto"
        else max(1, min(10, math.ceil(24 * batch / max(n_examples, 1))))
    )
    lr = hp.learning_rate_multiplier if hp.learning_rate_multiplier != "auto" else 1.0
    return ResolvedHyperparameters(n_epochs=epochs, batch_size=batch, learning_rate_multiplier=lr)


def job_object(row: FineTuningJob) -> JobObject:
    hp = ResolvedHyperparameters.model_validate(row.hyperparameters)
    return JobObject(
        id=row.id,
        created_at=ts(row.created_at) or 0,
        error=JobError(**row.error_json) if row.error_json else None,
        fine_tuned_model=row.fine_tuned_model,
        finished_at=ts(row.finished_at),
        hyperparameters=hp,
        method=ResolvedMethod(supervised={"hyperparameters": hp}),
        model=row.model,
        organization_id=row.team_id or row.user_id,
        seed=row.seed,
        status=row.status,  # type: ignore[arg-type]
        trained_tokens=row.trained_tokens if row.status == "succeeded" else None,
        training_file=row.training_file,
        validation_file=row.validation_file,
        metadata=row.metadata_json,
        user_provided_suffix=row.suffix,
    )


def event_object(row: FineTuningEvent) -> EventObject:
    return EventObject(
        id=row.id,
        created_at=ts(row.created_at) or 0,
        level=row.level,  # type: ignore[arg-type]
        message=row.message,
        type=row.type,  # type: ignore[arg-type]
        data=row.data,
    )


def checkpoint_object(row: FineTuningCheckpoint, job: FineTuningJob) -> CheckpointObject:
    base = job.fine_tuned_model or f"ft:{job.model}:{job.team_id or job.user_id}::{job.id[6:]}"
    return CheckpointObject(
        id=row.id,
        created_at=ts(row.created_at) or 0,
        fine_tuned_model_checkpoint=f"{base}:ckpt-step-{row.step}",
        fine_tuning_job_id=job.id,
        metrics=CheckpointMetrics(step=row.step, train_loss=row.metrics.get("train_loss")),
        step_number=row.step,
    )


@dataclass(frozen=True, slots=True)
class FineTuningLimits:
    max_active_jobs: int = 1
    max_examples: int = 10_000
    max_seq_tokens: int = 1024


class FineTuningService:
    def __init__(
        self,
        session: AsyncSession,
        files: FileStore,
        base_models: dict[str, tuple[Path, int]],  # trainable model id → (GGUF, context)
        limits: FineTuningLimits,
    ) -> None:
        self.session = session
        self.files = files
        self.base_models = base_models
        self.limits = limits

    async def _training_file(self, user_id: str, file_id: str, param: str) -> bytes:
        row = await self.session.scalar(
            select(StoredFile).where(
                StoredFile.id == file_id,
                StoredFile.user_id == user_id,
                StoredFile.deleted_at.is_(None),
            )
        )
        if row is None:
            raise InvalidRequestError(f"No such file: {file_id}", param=param)
        if row.purpose != PURPOSE:
            raise InvalidRequestError(
                f"File {file_id} has purpose `{row.purpose}`; upload it with purpose `fine-tune`.",
                param=param,
            )
        return await asyncio.to_thread(self.files.read, file_id)

    async def _check_quota(self, user_id: str) -> None:
        active = await self.session.scalar(
            select(func.count())
            .select_from(FineTuningJob)
            .where(FineTuningJob.user_id == user_id, FineTuningJob.status.in_(ACTIVE))
        )
        limit = self.limits.max_active_jobs
        if (active or 0) >= limit:
            raise InvalidRequestError(
                f"Active fine-tuning job limit reached: you have {active} jobs not yet finished "
                f"(limit {limit}). Wait for one to finish, or cancel one.",
                code="fine_tuning_job_limit_exceeded",
            )

    async def _validate(
        self, user_id: str, file_id: str, gguf: Path, context: int, param: str
    ) -> int:
        """Parse and tokenize a training (or validation) file; 400 with per-line errors."""
        data = await self._training_file(user_id, file_id, param)
        max_tokens = min(self.limits.max_seq_tokens, context)

        def check() -> int:
            examples = parse_examples(data, max_examples=self.limits.max_examples, param=param)
            tokenize_examples(examples, tokenizer_for(gguf), max_tokens=max_tokens, param=param)
            return len(examples)

        return await asyncio.to_thread(check)

    async def create(
        self, user_id: str, team_id: str | None, req: CreateFineTuningJobRequest
    ) -> FineTuningJob:
        extra.require()
        if req.model not in self.base_models:
            raise InvalidRequestError(
                f"The model `{req.model}` cannot be fine-tuned here; trainable models: "
                f"{', '.join(sorted(self.base_models))}.",
                param="model",
                code="model_not_available",
            )
        if req.hyperparameters is not None and req.method is not None:
            raise InvalidRequestError(
                "Give hyperparameters either at the top level or in `method`, not both.",
                param="hyperparameters",
            )
        await self._check_quota(user_id)
        gguf, context = self.base_models[req.model]
        n = await self._validate(user_id, req.training_file, gguf, context, "training_file")
        if req.validation_file:
            await self._validate(user_id, req.validation_file, gguf, context, "validation_file")
        hp = req.hyperparameters or (
            req.method.supervised.hyperparameters
            if req.method is not None and req.method.supervised is not None
            else Hyperparameters()
        )
        resolved = resolve_hyperparameters(hp, n)
        row = FineTuningJob(
            id=new_job_id(),
            user_id=user_id,
            team_id=team_id,
            model=req.model,
            training_file=req.training_file,
            validation_file=req.validation_file,
            suffix=req.suffix,
            seed=req.seed if req.seed is not None else secrets.randbelow(2**31),
            hyperparameters=resolved.model_dump(),
            status="queued",
            metadata_json=dict(req.metadata) if req.metadata else None,
            trained_tokens=0,
            total_steps=resolved.n_epochs * math.ceil(n / resolved.batch_size),
            step=0,
            created_at=datetime.now(UTC),
        )
        self.session.add(row)
        await self.session.flush()  # the job row before its events (foreign key)
        self.session.add(event_row(row.id, f"Validated training file: {n} examples"))
        self.session.add(event_row(row.id, "Fine-tuning job queued"))
        return row

    async def get(self, user_id: str, job_id: str) -> FineTuningJob:
        row = await self.session.scalar(
            select(FineTuningJob).where(
                FineTuningJob.id == job_id, FineTuningJob.user_id == user_id
            )
        )
        if row is None:
            raise NotFoundError(f"No such fine-tuning job: {job_id}", param="fine_tuning_job_id")
        return row

    async def list_jobs(
        self, user_id: str, after: str | None, limit: int
    ) -> tuple[list[FineTuningJob], bool]:
        anchor = await self.get(user_id, after) if after else None
        return await newest_first(
            self.session,
            select(FineTuningJob).where(FineTuningJob.user_id == user_id),
            FineTuningJob.created_at,
            FineTuningJob.id,
            anchor,
            limit,
        )

    async def cancel(self, user_id: str, job_id: str) -> FineTuningJob:
        """Cancelled at once in the database; a worker training it sees that within a second
        and stops after the step it is on."""
        row = await self.get(user_id, job_id)
        if row.status in TERMINAL:
            raise InvalidRequestError(
                f"Fine-tuning job {job_id} is already {row.status}.", code="job_not_cancellable"
            )
        row.status, row.finished_at = "cancelled", datetime.now(UTC)
        self.session.add(event_row(row.id, "Fine-tuning job cancelled"))
        return row

    async def events(
        self, user_id: str, job_id: str, after: str | None, limit: int
    ) -> tuple[list[FineTuningEvent], bool]:
        """Newest first, as OpenAI lists them; `after` an event id to page on."""
        await self.get(user_id, job_id)
        anchor = None
        if after:
            anchor = await self.session.scalar(
                select(FineTuningEvent).where(
                    FineTuningEvent.id == after, FineTuningEvent.job_id == job_id
                )
            )
            if anchor is None:
                raise NotFoundError(f"No such event: {after}", param="after")
        return await newest_first(
            self.session,
            select(FineTuningEvent).where(FineTuningEvent.job_id == job_id),
            FineTuningEvent.seq,
            FineTuningEvent.id,
            anchor,
            limit,
        )

    async def checkpoints(
        self, user_id: str, job_id: str, limit: int
    ) -> tuple[FineTuningJob, list[FineTuningCheckpoint], bool]:
        job = await self.get(user_id, job_id)
        rows = list(
            await self.session.scalars(
                select(FineTuningCheckpoint)
                .where(FineTuningCheckpoint.job_id == job_id)
                .order_by(FineTuningCheckpoint.step.desc())
                .limit(limit + 1)
            )
        )
        return job, rows[:limit], len(rows) > limit

    async def delete_model(self, user_id: str, model: str) -> FineTuningJob:
        """Hide a fine-tuned model (its owner only, as OpenAI lets the owner delete it)."""
        row = await self.session.scalar(
            select(FineTuningJob).where(
                FineTuningJob.fine_tuned_model == model,
                FineTuningJob.user_id == user_id,
                FineTuningJob.model_deleted_at.is_(None),
            )
        )
        if row is None:
            raise ModelNotFoundError(model)
        row.model_deleted_at = datetime.now(UTC)
        return row


async def cancel_user_jobs(session: AsyncSession, user_id: str) -> int:
    """Cancel every unfinished fine-tuning job of a user (on deactivation); a training one stops
    after its current step. Returns how many."""
    result = await session.execute(
        update(FineTuningJob)
        .where(FineTuningJob.user_id == user_id, FineTuningJob.status.in_(ACTIVE))
        .values(status="cancelled", finished_at=datetime.now(UTC))
    )
    return int(result.rowcount)  # type: ignore[attr-defined]
