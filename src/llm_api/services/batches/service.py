"""Files and batches as the API sees them: ownership, validation, state changes.

Every lookup is scoped to the owner, so another user's id is simply "not found" (404, never 403).
The session is the request's; this service never commits (the DbSession dependency does).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from llm_api.core.exceptions import InvalidRequestError, NotFoundError
from llm_api.db.tables import Batch, StoredFile
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

TERMINAL = ("completed", "failed", "expired", "cancelled")


def _ts(value: datetime | None) -> int | None:
    if value is None:
        return None
    value = value if value.tzinfo else value.replace(tzinfo=UTC)
    return int(value.timestamp())


def file_object(row: StoredFile) -> FileObject:
    return FileObject(
        id=row.id,
        bytes=row.bytes,
        created_at=_ts(row.created_at) or 0,
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
        created_at=_ts(row.created_at) or 0,
        in_progress_at=_ts(row.in_progress_at),
        expires_at=_ts(row.expires_at),
        finalizing_at=_ts(row.finalizing_at),
        completed_at=_ts(row.completed_at),
        failed_at=_ts(row.failed_at),
        cancelling_at=_ts(row.cancelling_at),
        cancelled_at=_ts(row.cancelled_at),
        request_counts=RequestCounts(total=row.total, completed=row.completed, failed=row.failed),
        metadata=row.metadata_json,
    )


class BatchService:
    def __init__(self, session: AsyncSession, files: FileStore, *, max_bytes: int, max_lines: int):
        self.session = session
        self.files = files
        self.max_bytes = max_bytes
        self.max_lines = max_lines

    # --- files ----------------------------------------------------------------------------------

    async def upload(self, user_id: str, filename: str, purpose: str, data: bytes) -> StoredFile:
        if purpose != "batch":
            raise InvalidRequestError("Only purpose `batch` is supported.", param="purpose")
        if len(data) > self.max_bytes:
            raise InvalidRequestError(
                f"The file is larger than {self.max_bytes} bytes.", param="file"
            )
        validate_input(data, max_lines=self.max_lines)
        row = StoredFile(
            id=new_file_id(),
            user_id=user_id,
            filename=(filename or "input.jsonl")[:255],
            purpose=purpose,
            bytes=len(data),
        )
        self.files.write(row.id, data)
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
        if row.purpose != "batch":  # output files grow while their batch runs
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
            if row.purpose != "batch":
                row.bytes = self.files.size(row.id)
        return rows

    async def file_content(self, user_id: str, file_id: str) -> bytes:
        await self.get_file(user_id, file_id)
        return self.files.read(file_id)

    async def delete_file(self, user_id: str, file_id: str) -> None:
        row = await self.get_file(user_id, file_id)
        row.deleted_at = datetime.now(UTC)
        self.files.delete(file_id)

    # --- batches --------------------------------------------------------------------------------

    async def create_batch(self, user_id: str, req: CreateBatchRequest) -> Batch:
        source = await self.get_file(user_id, req.input_file_id)
        if source.purpose != "batch":
            raise InvalidRequestError(
                "The input file must have purpose `batch`.", param="input_file_id"
            )
        lines = iter_lines(self.files.read(source.id))
        if any(line.url != req.endpoint for line in lines):
            raise InvalidRequestError(
                f"Every line's `url` must be {req.endpoint}.", param="endpoint"
            )
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
        query = select(Batch).where(Batch.user_id == user_id)
        if after:
            anchor = await self.get_batch(user_id, after)
            query = query.where(
                (Batch.created_at < anchor.created_at)
                | ((Batch.created_at == anchor.created_at) & (Batch.id < anchor.id))
            )
        rows = list(
            await self.session.scalars(
                query.order_by(Batch.created_at.desc(), Batch.id.desc()).limit(limit + 1)
            )
        )
        return rows[:limit], len(rows) > limit

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
