"""Files and batches as the API sees them: ownership, validation, state changes.

Every lookup is scoped to the owner, so another user's id is simply "not found" (404, never 403).
The session is the request's; this service never commits (the DbSession dependency does).

Quotas (per user; `StorageQuotas`): stored bytes and file count (uploads and batch results), and
batches not yet finished. Exceeding one is a 400 `invalid_request_error` with a code naming it,
as OpenAI answers an organisation over its file storage quota. Parsing and validating a file is
CPU work of up to seconds (50 MB), and writing it an fsync: both run in a thread, never on the
event loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import func, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from llm_api.core.exceptions import InvalidRequestError, NotFoundError
from llm_api.db.tables import Batch, StoredFile, User
from llm_api.schemas.batches import (
    BatchErrorItem,
    BatchErrors,
    BatchList,
    BatchObject,
    CreateBatchRequest,
    FileObject,
    RequestCounts,
)
from llm_api.services.batches.input_file import iter_lines, validate_input
from llm_api.services.batches.storage import FileStore, new_batch_id, new_file_id
from llm_api.services.fine_tuning.dataset import parse_examples
from llm_api.services.paging import newest_first

TERMINAL = ("completed", "failed", "expired", "cancelled")


@dataclass(frozen=True, slots=True)
class StorageQuotas:
    """Per-user limits (settings `files_max_bytes_per_user`, `files_max_count_per_user`,
    `batch_max_active_per_user`)."""

    max_stored_bytes: int = 1024 * 1024 * 1024
    max_files: int = 1000
    max_active_batches: int = 10


def ts(value: datetime | None) -> int | None:
    """A stored time as Unix seconds (SQLite hands back naive datetimes: they are UTC)."""
    if value is None:
        return None
    value = value if value.tzinfo else value.replace(tzinfo=UTC)
    return int(value.timestamp())


def file_object(row: StoredFile) -> FileObject:
    return FileObject(
        id=row.id,
        bytes=row.bytes,
        created_at=ts(row.created_at) or 0,
        filename=row.filename,
        purpose=row.purpose,
    )


def batch_object(row: Batch, files: FileStore) -> BatchObject:
    errors = (
        BatchErrors(data=[BatchErrorItem(**e) for e in row.errors_json])
        if row.errors_json
        else None
    )
    # Output/error files are visible once they hold something: they grow while a batch runs,
    # and a cancelled batch leaves its partial output downloadable.
    out = row.output_file_id if row.output_file_id and files.size(row.output_file_id) else None
    err = row.error_file_id if row.error_file_id and files.size(row.error_file_id) else None
    return BatchObject(
        id=row.id,
        endpoint=row.endpoint,
        errors=errors,
        input_file_id=row.input_file_id,
        completion_window=row.completion_window,
        status=row.status,  # type: ignore[arg-type]
        output_file_id=out,
        error_file_id=err,
        created_at=ts(row.created_at) or 0,
        in_progress_at=ts(row.in_progress_at),
        expires_at=ts(row.expires_at),
        finalizing_at=ts(row.finalizing_at),
        completed_at=ts(row.completed_at),
        failed_at=ts(row.failed_at),
        cancelling_at=ts(row.cancelling_at),
        cancelled_at=ts(row.cancelled_at),
        request_counts=RequestCounts(total=row.total, completed=row.completed, failed=row.failed),
        metadata=row.metadata_json,
    )


class BatchService:
    def __init__(
        self,
        session: AsyncSession,
        files: FileStore,
        *,
        max_bytes: int,
        max_lines: int,
        quotas: StorageQuotas | None = None,
    ):
        self.session = session
        self.files = files
        self.max_bytes = max_bytes
        self.max_lines = max_lines
        self.quotas = quotas or StorageQuotas()

    # --- quotas ---------------------------------------------------------------------------------

    async def _check_storage(
        self, user_id: str, new_files: int, new_bytes: int, *, lock: bool = True
    ) -> None:
        """Refuse when `new_files` more files of `new_bytes` would exceed the user's quotas.
        Batch results count from when their batch ends (their size is recorded then); a
        running batch's results are bounded by its lines and the owner's token quota."""
        if lock:
            # Serialises one user's uploads on PostgreSQL (a row lock until commit), so two at
            # once cannot both pass; SQLite has no row locks (it compiles to a plain SELECT).
            await self.session.execute(select(User.id).where(User.id == user_id).with_for_update())
        count, stored = (
            await self.session.execute(
                select(func.count(), func.coalesce(func.sum(StoredFile.bytes), 0)).where(
                    StoredFile.user_id == user_id, StoredFile.deleted_at.is_(None)
                )
            )
        ).one()
        q = self.quotas
        if count + new_files > q.max_files:
            raise InvalidRequestError(
                f"You have reached your file quota of {q.max_files} files (batch output and "
                "error files count too). Delete files you no longer need and try again.",
                code="file_quota_exceeded",
            )
        if stored + new_bytes > q.max_stored_bytes:
            raise InvalidRequestError(
                f"You have exceeded your file storage quota of {q.max_stored_bytes} bytes "
                f"({stored} stored). Delete files you no longer need or upload a smaller file.",
                param="file",
                code="storage_quota_exceeded",
            )

    async def _check_active_batches(self, user_id: str) -> None:
        active = await self.session.scalar(
            select(func.count())
            .select_from(Batch)
            .where(Batch.user_id == user_id, Batch.status.not_in(TERMINAL))
        )
        limit = self.quotas.max_active_batches
        if (active or 0) >= limit:
            raise InvalidRequestError(
                f"Active batch limit reached: you have {active} batches not yet finished "
                f"(limit {limit}). Try again once some of them have completed, or cancel one.",
                code="batch_limit_exceeded",
            )

    # --- files ----------------------------------------------------------------------------------

    async def upload(self, user_id: str, filename: str, purpose: str, data: bytes) -> StoredFile:
        if purpose not in ("batch", "fine-tune"):
            raise InvalidRequestError(
                "Only purposes `batch` and `fine-tune` are supported.", param="purpose"
            )
        if len(data) > self.max_bytes:
            raise InvalidRequestError(
                f"The file is larger than {self.max_bytes} bytes.", param="file"
            )
        # Refused before the (costly) validation, and checked again under the lock after it.
        await self._check_storage(user_id, 1, len(data), lock=False)
        if purpose == "batch":
            await asyncio.to_thread(validate_input, data, max_lines=self.max_lines)
        else:  # the examples' structure now; their lengths when a job is created
            await asyncio.to_thread(parse_examples, data, max_examples=self.max_lines, param="file")
        await self._check_storage(user_id, 1, len(data))
        row = StoredFile(
            id=new_file_id(),
            user_id=user_id,
            filename=(filename or "input.jsonl")[:255],
            purpose=purpose,
            bytes=len(data),
        )
        await asyncio.to_thread(self.files.write, row.id, data)
        self.session.add(row)
        return row

    async def get_file(self, user_id: str, file_id: str) -> StoredFile:
        row = await self.session.scalar(
            select(StoredFile).where(
                StoredFile.id == file_id,
                StoredFile.user_id == user_id,
                StoredFile.deleted_at.is_(None),
            )
        )
        if row is None:
            raise NotFoundError(f"No such file: {file_id}", param="file_id")
        if row.purpose not in ("batch", "fine-tune"):  # output files grow while their batch runs
            row.bytes = self.files.size(row.id)
        return row

    async def list_files(self, user_id: str, purpose: str | None) -> list[StoredFile]:
        query = select(StoredFile).where(
            StoredFile.user_id == user_id, StoredFile.deleted_at.is_(None)
        )
        if purpose:
            query = query.where(StoredFile.purpose == purpose)
        rows = list(await self.session.scalars(query.order_by(StoredFile.created_at.desc())))
        for row in rows:
            if row.purpose not in ("batch", "fine-tune"):
                row.bytes = self.files.size(row.id)
        return rows

    async def file_content(self, user_id: str, file_id: str) -> bytes:
        await self.get_file(user_id, file_id)
        return await asyncio.to_thread(self.files.read, file_id)

    async def delete_file(self, user_id: str, file_id: str) -> None:
        row = await self.get_file(user_id, file_id)
        row.deleted_at = datetime.now(UTC)
        self.files.delete(file_id)

    # --- batches --------------------------------------------------------------------------------

    async def create_batch(
        self,
        user_id: str,
        req: CreateBatchRequest,
        check_model: Callable[[str], object] | None = None,
    ) -> Batch:
        """`check_model` refuses a line's model the caller's key may not use (403)."""
        source = await self.get_file(user_id, req.input_file_id)
        if source.purpose != "batch":
            raise InvalidRequestError(
                "The input file must have purpose `batch`.", param="input_file_id"
            )
        await self._check_active_batches(user_id)
        await self._check_storage(user_id, 2, 0)  # the batch's output and error files
        lines = await asyncio.to_thread(lambda: iter_lines(self.files.read(source.id)))
        if any(line.url != req.endpoint for line in lines):
            raise InvalidRequestError(
                f"Every line's `url` must be {req.endpoint}.", param="endpoint"
            )
        if check_model is not None:
            for model in dict.fromkeys(str(line.body.get("model")) for line in lines):
                check_model(model)
        now = datetime.now(UTC)
        row = Batch(
            id=new_batch_id(),
            user_id=user_id,
            endpoint=req.endpoint,
            model=str(lines[0].body.get("model")) if lines else None,
            input_file_id=source.id,
            status="validating",
            completion_window=req.completion_window,
            metadata_json=dict(req.metadata) if req.metadata else None,
            total=len(lines),
            completed=0,
            failed=0,
            created_at=now,
            expires_at=now + timedelta(hours=24),
        )
        self.session.add(row)
        return row

    async def get_batch(self, user_id: str, batch_id: str) -> Batch:
        row = await self.session.scalar(
            select(Batch).where(Batch.id == batch_id, Batch.user_id == user_id)
        )
        if row is None:
            raise NotFoundError(f"No such batch: {batch_id}", param="batch_id")
        return row

    async def list_batches(
        self, user_id: str, after: str | None, limit: int
    ) -> tuple[list[Batch], bool]:
        anchor = await self.get_batch(user_id, after) if after else None
        return await newest_first(
            self.session,
            select(Batch).where(Batch.user_id == user_id),
            Batch.created_at,
            Batch.id,
            anchor,
            limit,
        )

    async def cancel_batch(self, user_id: str, batch_id: str) -> Batch:
        row = await self.get_batch(user_id, batch_id)
        if row.status in TERMINAL:
            raise InvalidRequestError(
                f"Batch {batch_id} is already {row.status}.", code="batch_not_cancellable"
            )
        now = datetime.now(UTC)
        if row.lease_owner is None and row.status == "validating":
            row.status, row.cancelling_at, row.cancelled_at = "cancelled", now, now
        else:
            row.status, row.cancelling_at = "cancelling", row.cancelling_at or now
        return row

    def page(self, rows: list[Batch], has_more: bool) -> BatchList:
        data = [batch_object(r, self.files) for r in rows]
        return BatchList(
            data=data,
            first_id=data[0].id if data else None,
            last_id=data[-1].id if data else None,
            has_more=has_more,
        )


async def cancel_user_batches(session: AsyncSession, user_id: str) -> int:
    """Cancel every unfinished batch of a user (on deactivation): unstarted ones at once, running
    ones through `cancelling`, which their worker sees within a second and stops. Returns how
    many were cancelled."""
    now = datetime.now(UTC)
    unfinished = (Batch.user_id == user_id) & Batch.status.not_in(TERMINAL)
    unstarted = await session.execute(
        update(Batch)
        .where(unfinished, Batch.status == "validating", Batch.lease_owner.is_(None))
        .values(status="cancelled", cancelling_at=now, cancelled_at=now)
    )
    running = await session.execute(
        update(Batch)
        .where(unfinished, Batch.status != "cancelling")
        .values(status="cancelling", cancelling_at=func.coalesce(Batch.cancelling_at, now))
    )
    return int(unstarted.rowcount + running.rowcount)  # type: ignore[attr-defined]
